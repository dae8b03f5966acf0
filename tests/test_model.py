"""Model shapes for every official size (no weights), cache mechanics and dtype handling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from whisperjax_cli.dims import OFFICIAL_DIMS, ModelDimensions
from whisperjax_cli.kv_cache import KVCache, init_cache, repeat_rows, take_rows, take_slots
from whisperjax_cli.model import Whisper
from whisperjax_cli.weights import expected_shapes, name_table


@pytest.mark.parametrize("name", sorted(OFFICIAL_DIMS))
def test_eval_shape_every_official_size(name):
    dims = OFFICIAL_DIMS[name]
    model = Whisper(dims)
    mel = jax.ShapeDtypeStruct((2, 3000, dims.n_mels), jnp.float32)
    tokens = jax.ShapeDtypeStruct((2, 5), jnp.int32)
    params = jax.eval_shape(lambda m, t: model.init(jax.random.PRNGKey(0), m, t), mel, tokens)["params"]
    audio = jax.eval_shape(lambda p, m: model.apply({"params": p}, m, method=Whisper.encode), params, mel)
    assert audio.shape == (2, dims.n_audio_ctx, dims.n_audio_state)
    cross = jax.eval_shape(lambda p, a: model.apply({"params": p}, a, method=Whisper.cross_kv), params, audio)
    assert len(cross[0]) == dims.n_text_layer
    head_dim = dims.n_text_state // dims.n_text_head
    assert cross[0][0].shape == (2, dims.n_text_head, head_dim, dims.n_audio_ctx)  # keys transposed
    assert cross[1][0].shape == (2, dims.n_text_head, dims.n_audio_ctx, head_dim)

    def step(p, cross):
        cache = init_cache(dims, cross, 16)
        return model.apply({"params": p}, jnp.zeros((2, 1), jnp.int32), cache, jnp.int32(3), method=Whisper.decode)

    logits, cache = jax.eval_shape(step, params, cross)
    assert logits.shape == (2, 1, dims.n_vocab) and logits.dtype == jnp.float32
    assert cache.self_k[0].shape == (2 * dims.n_text_head, 16, dims.n_text_state // dims.n_text_head)
    # The name table covers every parameter exactly once.
    leaves = {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
    assert leaves == {ours for ours, _, _ in name_table(dims)}
    n_params = sum(np.prod(s) for s in expected_shapes(dims).values())
    assert n_params > 30e6


def test_large_v3_has_128_mels_and_100_languages():
    dims = OFFICIAL_DIMS["large-v3"]
    assert dims.n_mels == 128 and dims.num_languages == 100 and dims.is_multilingual
    assert OFFICIAL_DIMS["base"].num_languages == 99 and not OFFICIAL_DIMS["tiny.en"].is_multilingual


def test_dims_round_trip_hf_config_and_hashable():
    dims = OFFICIAL_DIMS["small"]
    assert ModelDimensions.from_hf_config(dims.to_hf_config()) == dims
    assert hash(dims) == hash(ModelDimensions.from_hf_config(dims.to_hf_config()))


class Jitted:
    """A module whose ``apply`` runs jitted: one compile per method, Python arguments and shapes,
    where eager calls compile every operation of the model on its own (~30 s of this file's
    tests on 2 cores)."""

    def __init__(self, module):
        self.module = module
        self._programs = {}

    def apply(self, variables, *args, method=None):
        arrays = [i for i, a in enumerate(args) if not isinstance(a, (int, float, str))]  # arrays and pytrees
        others = tuple((i, a) for i, a in enumerate(args) if i not in arrays)
        key = (method, others, tuple(arrays))
        if key not in self._programs:
            def run(variables, *xs):
                full = dict(others) | dict(zip(arrays, xs))
                return self.module.apply(variables, *(full[i] for i in range(len(args))), method=method)

            self._programs[key] = jax.jit(run)
        return self._programs[key](variables, *(args[i] for i in arrays))


@functools.lru_cache(maxsize=1)
def _tiny_random():
    dims = ModelDimensions(8, 10, 16, 2, 1, 40, 12, 16, 2, 2)
    model = Jitted(Whisper(dims))
    init = jax.jit(Whisper(dims).init)
    params = init(jax.random.PRNGKey(1), jnp.zeros((1, 20, 8)), jnp.zeros((1, 1), jnp.int32))["params"]
    mel = jax.random.normal(jax.random.PRNGKey(2), (2, 20, 8))
    return dims, model, params, mel


def test_cached_step_by_step_equals_teacher_forcing():
    """Feeding tokens one at a time through the cache gives the full-sequence logits."""
    dims, model, params, mel = _tiny_random()
    tokens = jnp.array([[1, 5, 7, 3, 9], [2, 4, 6, 8, 10]], jnp.int32)
    full = model.apply({"params": params}, mel, tokens)
    audio = model.apply({"params": params}, mel, method=Whisper.encode)
    cache = init_cache(dims, model.apply({"params": params}, audio, method=Whisper.cross_kv), 8)
    steps = []
    for i in range(tokens.shape[1]):
        logits, cache = model.apply({"params": params}, tokens[:, i : i + 1], cache, jnp.int32(i), method=Whisper.decode)
        steps.append(logits[:, 0])
    np.testing.assert_allclose(np.stack(steps, 1), full, atol=1e-5)
    # The buffers were written at slots 0..4 and nowhere else.
    k = np.asarray(cache.self_k[0])
    assert np.abs(k[:, :5]).sum() > 0 and np.all(k[:, 5:] == 0)


def test_few_rows_product_equals_the_matrix_product_and_a_decode_step_uses_it(monkeypatch):
    """The streamed product of a few rows equals XLA's (float32 sums in another order); a model
    with ``stream_rows`` projects a step of 2-``stream_rows`` rows with it, and one row or more
    rows with XLA's product, with the same logits either way."""
    from whisperjax_cli import model as model_module

    rng = np.random.default_rng(0)
    for rows, width in ((2, 384), (5, 384), (8, 384), (5, 387)):  # 387: a remainder after the steps of 8
        w = rng.standard_normal((width, 1000)).astype(np.float32)
        x = rng.standard_normal((rows, width)).astype(np.float32)
        np.testing.assert_allclose(model_module.few_rows_product(x, w), x.astype(np.float64) @ w, rtol=1e-4,
                                   atol=1e-4)
    dims, model, params, mel = _tiny_random()
    streamed = Jitted(Whisper(dims, stream_rows=4))
    calls = []
    product = model_module.few_rows_product
    monkeypatch.setattr(model_module, "few_rows_product", lambda x, w: calls.append(x.shape) or product(x, w))
    audio = model.apply({"params": params}, mel, method=Whisper.encode)
    cross = model.apply({"params": params}, audio, method=Whisper.cross_kv)
    for tokens in (jnp.array([[1], [5]]), jnp.array([[1, 5, 7]] * 2), jnp.array([[1]])):
        rows = tokens.size
        cache = init_cache(dims, jax.tree_util.tree_map(lambda c: c[: tokens.shape[0]], cross), 8)
        plain, _ = model.apply({"params": params}, tokens, cache, jnp.int32(0), method=Whisper.decode)
        calls.clear()
        ours, _ = streamed.apply({"params": params}, tokens, cache, jnp.int32(0), method=Whisper.decode)
        assert calls == ([(rows, dims.n_text_state)] if 2 <= rows <= 4 else []), rows
        np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-5)


def test_a_beam_group_step_streams_its_cross_attention_scores(monkeypatch):
    """few_rows_product batched over leading axes equals XLA's product (float32 sums in another
    order); a model with ``stream_rows`` computes a decode step's cross-attention scores with it
    when several rows share each audio (beams, samples), not for one row per audio, with the
    same logits either way."""
    from whisperjax_cli import model as model_module

    rng = np.random.default_rng(1)
    for queries, width in ((1, 64), (5, 64), (5, 67)):  # 67: a remainder after the steps of 8
        q = rng.standard_normal((2, 3, queries, width)).astype(np.float32)
        k = rng.standard_normal((2, 3, width, 50)).astype(np.float32)
        np.testing.assert_allclose(model_module.few_rows_product(q, k), np.einsum("ahtd,ahds->ahts", q, k),
                                   rtol=1e-4, atol=1e-4)
    dims, model, params, mel = _tiny_random()
    streamed = Jitted(Whisper(dims, stream_rows=4))
    calls = []
    product = model_module.few_rows_product
    monkeypatch.setattr(model_module, "few_rows_product", lambda x, w: calls.append(x.shape) or product(x, w))
    audio = model.apply({"params": params}, mel, method=Whisper.encode)
    cross = model.apply({"params": params}, audio, method=Whisper.cross_kv)  # 2 audios
    for group in (3, 1):
        cache = repeat_rows(init_cache(dims, cross, 8), group)  # rows 2 * group, audio keys once per audio
        tokens = jnp.arange(1, 2 * group + 1)[:, None]
        plain, _ = model.apply({"params": params}, tokens, cache, jnp.int32(0), method=Whisper.decode)
        calls.clear()
        ours, _ = streamed.apply({"params": params}, tokens, cache, jnp.int32(0), method=Whisper.decode)
        heads = dims.n_text_head
        scores = [shape for shape in calls if len(shape) == 4]  # the vocabulary projection's are [rows, state]
        assert scores == ([(2, heads, group, dims.n_text_state // heads)] * dims.n_text_layer if group > 1 else [])
        np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-5)


def test_left_padding_is_invisible():
    """A row left-padded by 3 slots gives the same logits as the unpadded row."""
    dims, model, params, mel = _tiny_random()
    audio = model.apply({"params": params}, mel[:1], method=Whisper.encode)
    cross = model.apply({"params": params}, audio, method=Whisper.cross_kv)
    plain, _ = model.apply({"params": params}, jnp.array([[1, 5, 7]]), init_cache(dims, cross, 8), jnp.int32(0),
                           method=Whisper.decode)
    padded, _ = model.apply({"params": params}, jnp.array([[0, 0, 0, 1, 5, 7]]), init_cache(dims, cross, 8),
                            jnp.int32(0), jnp.array([3], jnp.int32), method=Whisper.decode)
    np.testing.assert_allclose(padded[:, 3:], plain, atol=1e-5)


def test_cache_is_a_pytree_that_gathers_by_beam():
    dims, model, params, mel = _tiny_random()
    audio = model.apply({"params": params}, mel, method=Whisper.encode)
    cache = init_cache(dims, model.apply({"params": params}, audio, method=Whisper.cross_kv), 4)
    assert isinstance(cache, KVCache) and cache.length == 4
    swapped = jax.tree_util.tree_map(lambda x: x[jnp.array([1, 0])], cache)
    np.testing.assert_array_equal(swapped.cross_k[0][0], cache.cross_k[0][1])


def test_take_slots_moves_the_blocks_of_its_span_and_keeps_the_rest():
    """Beams reorder only the slots sampled since their shared prompt (take_slots): inside the
    blocks that the span touches every buffer equals take_rows's; outside, each row's own."""
    rng = np.random.default_rng(0)
    heads, length, rows = 2, 48, 3
    buffers = lambda: tuple(jnp.asarray(rng.standard_normal((rows * heads, length, 4)), jnp.float32)  # noqa: E731
                            for _ in range(2))
    cross = tuple(jnp.zeros((rows, heads, 5, 4)) for _ in range(2))
    cache = KVCache(self_k=buffers(), self_v=buffers(), cross_k=cross, cross_v=cross)
    src = jnp.array([2, 0, 0], jnp.int32)
    moved, whole = take_slots(cache, src, jnp.int32(19), jnp.int32(33), block=8), take_rows(cache, src)
    for got, want, own in zip(moved.self_k + moved.self_v, whole.self_k + whole.self_v, cache.self_k + cache.self_v):
        np.testing.assert_array_equal(got[:, 16:40], want[:, 16:40])  # blocks 2..4 hold slots 19..32
        np.testing.assert_array_equal(got[:, :16], own[:, :16])
        np.testing.assert_array_equal(got[:, 40:], own[:, 40:])
    empty = take_slots(cache, src, jnp.int32(24), jnp.int32(24), block=8)
    np.testing.assert_array_equal(empty.self_k[0], cache.self_k[0])
    with pytest.raises(ValueError, match="multiple of 5"):
        take_slots(cache, src, jnp.int32(0), jnp.int32(4), block=5)


def test_bfloat16_compute_keeps_float32_logits():
    dims, _, params, mel = _tiny_random()
    model = Jitted(Whisper(dims, jnp.bfloat16))
    bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    logits = model.apply({"params": bf16}, mel, jnp.array([[1, 2], [3, 4]]))
    ref = Jitted(Whisper(dims)).apply({"params": params}, mel, jnp.array([[1, 2], [3, 4]]))
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, ref, atol=0.15)


def test_mixed_matmuls_stay_close_to_float32_and_a_lone_row_equals_its_batch(tiny_en, clip_audio):
    """Mixed precision (bfloat16 products, float32 accumulation) on real weights and speech:
    logits within a few tenths of float32's, the same greedy token wherever it is clear; a single row, whose
    projection is padded to two (bfloat16's matrix-vector path is slow), equals its batch."""
    import dataclasses

    from whisperjax_cli import weights
    from whisperjax_cli.features import log_mel_spectrogram, pad_or_trim

    flat = {k: (v.astype(jnp.bfloat16) if weights.is_mixed_weight(tuple(k.split("/"))) else v)
            for k, v in weights.flatten(tiny_en.params).items()}
    mixed = dataclasses.replace(tiny_en, params=weights.unflatten(flat), matmul_dtype=jnp.bfloat16)
    mel = np.stack([pad_or_trim(log_mel_spectrogram(clip_audio[name])) for name in ("goforward.flac", "cards-001.flac")])
    tok = tiny_en.tokenizer
    texts = (" Go forward 10 meters.", " 10 of clubs. Go forward.")  # what each clip says, then more
    tokens = jnp.array([list(tok.sot_sequence) + [tok.no_timestamps] + tok.encode(t)[:5] for t in texts])
    run = lambda m, x, t: jax.jit(lambda p: m.module.apply({"params": p}, x, t))(m.params)  # noqa: E731
    ref, got = run(tiny_en, mel, tokens), run(mixed, mel, tokens)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, atol=0.25)
    top2 = np.sort(np.asarray(ref), axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 0.5  # not a near tie (as <|notimestamps|> vs <|0.00|> can be)
    assert clear.sum() >= 3
    np.testing.assert_array_equal(np.asarray(got.argmax(-1))[clear], np.asarray(ref.argmax(-1))[clear])
    lone = run(mixed, mel[:1], tokens[:1, :1])  # one row, one position: the padded projection
    # Bit-equal on a CPU with bfloat16 dot instructions; elsewhere XLA converts the operands and
    # the sums' order follows the batch, and a float32 difference can flip a bfloat16 rounding
    # (8e-4 seen on Zen 1). A wrong or unpadded row would be off by whole units.
    np.testing.assert_allclose(lone[0], run(mixed, mel, tokens[:, :1])[0], rtol=0, atol=5e-3)


def test_a_mixed_dense_multiplies_few_rows_in_float32_and_many_in_bfloat16():
    """The decoder's layers (float32 kernels) under mixed precision: a decode step's few rows
    multiply in float32 (bfloat16 was no faster there), a prompt's or the audio's many rows in
    bfloat16 with float32 accumulation."""
    from whisperjax_cli.model import MIXED_MIN_ROWS, dense, mixed_matmul

    layer = dense(48, jnp.float32, jnp.bfloat16, min_rows=MIXED_MIN_ROWS)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, MIXED_MIN_ROWS, 32))
    params = layer.init(jax.random.PRNGKey(1), x)
    kernel, bias = params["params"]["kernel"], params["params"]["bias"]
    assert kernel.dtype == jnp.float32
    few = x[:, : MIXED_MIN_ROWS // 2 - 1]  # fewer rows than the threshold in all
    np.testing.assert_allclose(layer.apply(params, few), few @ kernel + bias, rtol=1e-6, atol=1e-6)
    many = layer.apply(params, x)
    dims = (((2,), (0,)), ((), ()))
    np.testing.assert_allclose(many, mixed_matmul(x, kernel, dims, jnp.bfloat16) + bias, rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(many) - np.asarray(x @ kernel + bias)).max() > 1e-4  # bfloat16 operands indeed


def test_rows_sharing_an_audio_equal_repeating_it():
    """A prompt run once per audio, its cache rows repeated (repeat_rows) and the rows then
    grouped on one audio's cross keys/values, gives the logits of repeating audio and prompt."""
    dims, model, params, mel = _tiny_random()
    audio = model.apply({"params": params}, mel, method=Whisper.encode)  # 2 audios
    decode = lambda tokens, cache, index: model.apply(  # noqa: E731
        {"params": params}, tokens, cache, jnp.int32(index), method=Whisper.decode)
    prompts = jnp.array([[1, 5], [2, 6]], jnp.int32)
    nxt = jnp.array([[3], [4], [5], [6], [7], [8]], jnp.int32)  # 3 rows per audio
    _, once = decode(prompts, init_cache(dims, model.apply({"params": params}, audio, method=Whisper.cross_kv), 4), 0)
    grouped = repeat_rows(once, 3)
    repeated_audio = jnp.repeat(audio, 3, axis=0)
    empty = init_cache(dims, model.apply({"params": params}, repeated_audio, method=Whisper.cross_kv), 4)
    _, repeated = decode(jnp.repeat(prompts, 3, axis=0), empty, 0)
    a, _ = decode(nxt, grouped, 2)
    b, _ = decode(nxt, repeated, 2)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert grouped.cross_k[0].shape[0] == 2 and grouped.self_k[0].shape[0] == 6 * dims.n_text_head


@pytest.mark.parametrize("block", [7, 16, 64])
def test_target_probs_equal_a_softmax_over_the_text_vocabulary(block):
    """The blocked log-sum-exp gives the probabilities a whole-vocabulary softmax gives, whatever
    the block (7 and 16 do not divide the limit: the last block overlaps the one before; 64 is
    more than the whole vocabulary)."""
    dims, module, params, _ = _tiny_random()
    limit = dims.n_vocab - 3
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(0, 4, (5, dims.n_text_state)).astype(np.float32))  # peaked distributions
    targets = jnp.asarray([0, limit - 1, 3, 17, limit // 2], jnp.int32)
    logits = module.apply({"params": params}, x[None], method=Whisper.logits)[0, :, :limit]
    expected = np.exp(np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), np.asarray(targets)[:, None], 1))[:, 0]
    got = module.apply({"params": params}, x, targets, limit, block,
                       method=lambda m, *a: m.decoder.target_probs(*a))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-9)
    assert float(np.max(expected)) > 0.01  # the case is not all-uniform
