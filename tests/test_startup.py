"""What start-up shortcuts must keep equal: weight shapes without tracing, lazily split keys, weights read ahead."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from whisperjax_cli.window_decoder import LazyKey
from whisperjax_cli.dims import OFFICIAL_DIMS, ModelDimensions
from whisperjax_cli.errors import ModelError
from whisperjax_cli.model import Whisper
from whisperjax_cli.weights import expected_shapes, flatten, name_table

# Audio and text widths differ here, so the cross-attention key/value shapes are checked too.
UNEVEN = ModelDimensions(8, 10, 16, 2, 1, 40, 12, 24, 3, 2)


@pytest.mark.parametrize("dims", [OFFICIAL_DIMS["tiny.en"], OFFICIAL_DIMS["large-v3"], UNEVEN],
                         ids=["tiny.en", "large-v3", "uneven"])
def test_expected_shapes_equal_the_traced_init(dims):
    """The shape table worked out from the dimensions is what Flax's init makes."""
    params = jax.eval_shape(
        lambda: Whisper(dims).init(jax.random.PRNGKey(0), jnp.zeros((1, 2 * dims.n_audio_ctx, dims.n_mels)),
                                   jnp.zeros((1, 1), jnp.int32))["params"]
    )
    flat = flatten(params)
    traced = {}
    for ours, theirs, kind in name_table(dims):
        shape = flat[ours].shape
        traced[theirs] = shape[::-1] if kind in ("linear", "conv") else shape
    assert expected_shapes(dims) == traced


def test_lazy_key_draws_the_keys_of_eager_splits():
    root = jax.random.PRNGKey(7)
    eager, lazy = root, LazyKey(root)
    eager_subs, lazy_subs = [], []
    for _ in range(4):
        eager, sub = jax.random.split(eager)
        lazy, lazy_sub = lazy.split()
        eager_subs.append(sub)
        lazy_subs.append(lazy_sub)
    # Drawn out of order, and the chain's end last: each is the eager key all the same.
    for i in (2, 0, 3, 1):
        np.testing.assert_array_equal(lazy_subs[i].value(), eager_subs[i])
    np.testing.assert_array_equal(lazy.value(), eager)
    np.testing.assert_array_equal(LazyKey().split()[1].value(), jax.random.split(jax.random.PRNGKey(0))[1])


def test_download_with_hf_hub_offline_names_the_setting(monkeypatch, tmp_path):
    from whisperjax_cli.hub import hub_snapshot

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError) as err:
        hub_snapshot("nobody-wjx-test/absent", download=True)
    assert "HF_HUB_OFFLINE is set" in str(err.value) and "network" not in str(err.value)


def test_weights_read_ahead_are_those_load_model_reads(tiny_en):
    """read_ahead lays the weights out on a background thread (before JAX starts, in the CLI);
    load_model takes them when the path and dtype agree, and reads the files itself otherwise."""
    from whisperjax_cli import loading, weights

    pending = loading.read_ahead("tiny.en", None, "cpu")
    assert pending is not None
    model = loading.load_model("tiny.en", dtype="float32", pending=pending)
    want, got = jax.tree_util.tree_leaves(tiny_en.params), jax.tree_util.tree_leaves(model.params)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    pending = loading.read_ahead("tiny.en", "mixed", None)
    mixed = loading.load_model("tiny.en", dtype="mixed", pending=pending)
    assert mixed.dtype == jnp.float32 and mixed.matmul_dtype == jnp.bfloat16
    flat_mixed, flat_ref = weights.flatten(mixed.params), weights.flatten(tiny_en.params)
    assert sorted(flat_mixed) == sorted(flat_ref)
    for name, ref in flat_ref.items():
        got = flat_mixed[name]
        if weights.is_mixed_weight(tuple(name.split("/"))):
            assert got.dtype == jnp.bfloat16, name
            np.testing.assert_array_equal(np.asarray(got), np.asarray(ref).astype(jnp.bfloat16))
        else:
            assert got.dtype == jnp.float32, name
            np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    # The products mixed_matmul covers: every kernel of the encoder's blocks, and the embedding.
    assert sum(weights.is_mixed_weight(tuple(n.split("/"))) for n in flat_ref) == 6 * tiny_en.dims.n_audio_layer + 1

    pending = loading.read_ahead("tiny.en", "float16", None)
    assert pending.take(pending.path, np.float32) is None  # another dtype: not this read
    again = loading.load_model("tiny.en", dtype="float32", pending=pending)  # so it reads again
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(again.params))

    assert loading.read_ahead("no/such-model-here", None, "cpu") is None  # a Hub id: left to load_model


def test_guess_dtype_without_jax(monkeypatch):
    from whisperjax_cli.loading import _guess_dtype

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert _guess_dtype(None, "cpu") == np.float32
    assert _guess_dtype(None, "gpu") == jnp.bfloat16
    assert _guess_dtype("bfloat16", None) == jnp.bfloat16
    assert _guess_dtype(jnp.float16, None) == np.float16
    assert _guess_dtype("int8", None) is None
    assert _guess_dtype("mixed", None) == "mixed"
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert _guess_dtype(None, None) is None  # not known before JAX starts
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert _guess_dtype(None, None) == np.float32


def test_options_are_validated_in_one_place():
    """Every bad value is a UsageError (exit 2) naming the flag; mode defaults are resolved."""
    from whisperjax_cli.errors import UsageError
    from whisperjax_cli.options import TranscribeOptions, temperature_ladder

    bad = [dict(temperature=float("nan")), dict(temperature=(0.0, 1.5)), dict(beam_size=0), dict(best_of=-1),
           dict(beam_size=2, patience=-1.0), dict(patience=1.0), dict(length_penalty=float("inf")),
           dict(no_speech_threshold=2.0), dict(mode="fast"), dict(task="summarize"), dict(batch_size=0),
           dict(language="klingon"), dict(clip_timestamps="a,b"), dict(suppress_tokens="x"),
           dict(compression_ratio_threshold=float("nan")), dict(max_initial_timestamp=-1.0), dict(sample_len=0)]
    for fields in bad:
        with pytest.raises(UsageError):
            TranscribeOptions(**fields)
    with pytest.raises(UsageError, match="unknown option: beam"):
        TranscribeOptions.create(beam=5)
    assert TranscribeOptions().temperature == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert TranscribeOptions().condition_on_previous_text is True
    batched = TranscribeOptions(mode="batched")
    assert batched.temperature == (0.0,) and batched.condition_on_previous_text is False
    # Changing the mode re-resolves what was left to it, and keeps what was given.
    again = TranscribeOptions.create(batched, mode="sequential")
    assert again.temperature == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) and again.condition_on_previous_text is True
    given = TranscribeOptions.create(TranscribeOptions(temperature=0.3), mode="batched")
    assert given.temperature == (0.3,)  # given explicitly, kept (dataclasses.replace keeps fields)
    assert TranscribeOptions(language="French").language == "fr"
    assert temperature_ladder(0.5, 0.2) == (0.5, 0.7, 0.9) and temperature_ladder(0.3, 0) == (0.3,)
    hash(TranscribeOptions())  # frozen and hashable: a key for caches and servers


def test_given_weights_skip_flax_init_checks_but_not_their_shapes(monkeypatch):
    """Applying with given weights reads them without tracing their initializers (Flax's check
    eval_shapes each one: ~0.2 s of a new process's trace of decode_window), yet a weight of the
    wrong shape still fails."""
    import flax.errors

    model = Whisper(UNEVEN)
    mel = jnp.zeros((1, 2 * UNEVEN.n_audio_ctx, UNEVEN.n_mels))
    tokens = jnp.zeros((1, 2), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), mel, tokens)["params"]
    calls = []
    real = jax.eval_shape
    monkeypatch.setattr(jax, "eval_shape", lambda *a, **k: calls.append(a) or real(*a, **k))
    jax.make_jaxpr(lambda p: model.apply({"params": p}, mel, tokens))(params)
    assert calls == []
    block = params["decoder"]["blocks_0"]["mlp1"]
    bad = {**params, "decoder": {**params["decoder"], "blocks_0": {
        **params["decoder"]["blocks_0"], "mlp1": {**block, "kernel": block["kernel"][:, :-1]}}}}
    with pytest.raises(flax.errors.ScopeParamShapeError):
        model.apply({"params": bad}, mel, tokens)


KEEP_FREED = """
import ctypes, resource, sys
from whisperjax_cli.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 100 << 20, []  # an encoder-sized block, allocated, written and freed as XLA's buffers are
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[-1])
"""


def test_a_wjx_process_reuses_freed_memory_instead_of_faulting_it_in_again(monkeypatch):
    """A large block freed and allocated again (each encoder call's buffers) is faulted in
    page by page every time under glibc's defaults; ``wjx`` keeps it (runtime.keep_freed_memory),
    set before the command runs."""
    import subprocess
    import sys

    from whisperjax_cli import cli as cli_module
    from whisperjax_cli import runtime

    faults = {how: int(subprocess.run([sys.executable, "-c", KEEP_FREED, how], capture_output=True, text=True,
                                      check=True).stdout) for how in ("default", "keep")}
    assert faults["default"] > 20_000  # 100 MB of 4 KiB pages, every time
    assert faults["keep"] < 2_000

    calls = []

    def leave(code):
        raise SystemExit(code)

    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append("keep"))
    monkeypatch.setattr(runtime, "quiet_start", lambda: calls.append("quiet"))
    monkeypatch.setattr(cli_module.cli, "main", lambda **kwargs: calls.append("command") or 0)
    monkeypatch.setattr(cli_module.os, "_exit", leave)
    with pytest.raises(SystemExit):
        cli_module.main()
    assert calls == ["keep", "quiet", "command"]


QUIET_START = """
import gc, json, os, sys
import whisperjax_cli.cli  # what the wjx entry point imports before main() runs
numpy_first = "numpy" in sys.modules  # OpenBLAS reads its thread count once, when NumPy loads it
from whisperjax_cli.runtime import quiet_start, start_up_done
quiet_start()
seen = {"blas": os.environ.get("OPENBLAS_NUM_THREADS"), "paused": not gc.isenabled(), "numpy_first": numpy_first}
start_up_done()
seen.update(resumed=gc.isenabled(), frozen=gc.get_freeze_count())
print(json.dumps(seen))
"""


def test_a_wjx_command_starts_with_one_blas_thread_and_the_collector_paused_until_the_model_is_loaded():
    """runtime.quiet_start (run by ``main``, before anything has imported NumPy): OpenBLAS on one thread
    unless the user chose, the cyclic collector off; start_up_done freezes what start-up made
    and turns it back on. load_for_cli ends the pause, whether loading worked or not."""
    import gc
    import json
    import os
    import subprocess
    import sys

    from whisperjax_cli.cli_common import load_for_cli
    from whisperjax_cli.errors import ModelError

    def run(**env):
        base = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
        return json.loads(subprocess.run([sys.executable, "-c", QUIET_START], capture_output=True, text=True,
                                         check=True, env={**base, **env}).stdout)

    seen = run()
    assert seen["blas"] == "1" and seen["paused"] and seen["resumed"] and seen["frozen"] > 0
    assert not seen["numpy_first"]  # else the variable comes too late
    assert run(OPENBLAS_NUM_THREADS="4")["blas"] == "4"

    def broken(model, dtype=None):
        raise ValueError("no weights")

    gc.disable()
    try:
        with pytest.raises(ModelError):
            load_for_cli("tiny.en", None, None, None, True, loader=broken)
        assert gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()
