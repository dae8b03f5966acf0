"""Jitted decoding over the explicit KV cache: greedy and temperature sampling, language ID.

The loop is a pure step over a :class:`LoopState` pytree driven by ``lax.while_loop``; the
model call is passed in as ``step_fn``, so the loop can be tested with a stub that returns
scripted logits. Logit filters are pure ``(logits, ...) -> logits`` functions. The host side
(options, prompts, padding to buckets, temperature fallback) is :mod:`whisperjax_cli.window_decoder`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from whisperjax_cli.decode_types import DecodeInputs, DecodeOutput, pytree_dataclass
from whisperjax_cli.kv_cache import KVCache, init_cache, repeat_rows, take_rows
from whisperjax_cli.programs import stored_jit
from whisperjax_cli.timestamps import TimestampConfig, apply_timestamp_rules, hold_end_of_text

if TYPE_CHECKING:
    from whisperjax_cli.model import Whisper

Array = jax.Array
NEG_INF = -jnp.inf
LOOP_SPAN, LOOP_MAX_PERIOD = 48, 16  # a row is looping when its last 48 tokens repeat with a period <= 16


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Static settings of one decode loop (hashable: part of the compile key)."""

    sample_len: int  # tokens to sample at most
    eot: int
    no_speech: Optional[int]
    timestamps: Optional[TimestampConfig]  # None: without timestamps
    sample: bool = False  # True: sample at the given temperature; False: greedy (argmax)
    loop_span: int = 0  # > 0: end a row once it loops (see repeats_itself); 0: never
    group: int = 1  # consecutive rows per audio sharing one prompt (best-of samples)
    beam: Optional["BeamConfig"] = None  # beam search instead of greedy/sampling (temperature 0)
    keep_cross: bool = False  # return the audio's cross-attention keys/values (word timing reuses them)


@dataclasses.dataclass(frozen=True)
class BeamConfig:
    """Static settings of a beam search (OpenAI's ``beam_size``, ``patience``, ``length_penalty``)."""

    beam_size: int
    patience: Optional[float] = None
    length_penalty: Optional[float] = None
    # CTranslate2's rule, used by transcription: only endings among the top beam_size finish.
    finish_top_only: bool = False


@pytree_dataclass
class LoopState:
    tokens: Array  # int32 [batch, buffer]: prompt, then sampled tokens
    cur: Array  # int32 scalar: the next slot to write
    logits: Array  # float32 [batch, vocab]: logits for slot `cur`
    cache: KVCache
    sum_logprobs: Array  # float32 [batch]
    done: Array  # bool [batch]: saw end-of-text, or stopped looping
    key: Array  # PRNG key (sampling only)
    looped: Array  # bool [batch]: stopped because it looped (LoopConfig.loop_span)


def suppress(logits: Array, mask: Array) -> Array:
    """Masks the vocabulary entries where ``mask`` ``[vocab]`` is True."""
    return jnp.where(mask[None, :], NEG_INF, logits)


def suppress_at_begin(logits: Array, mask: Array, cur: Array, sample_begin: Array) -> Array:
    """OpenAI's SuppressBlank: no blank and no end-of-text as the first sampled token."""
    return jnp.where((cur == sample_begin) & mask[None, :], NEG_INF, logits)


def filter_logits(logits, tokens, cur, sample_begin, suppress_mask, begin_mask, config: LoopConfig,
                  hold: Optional[Array] = None):
    """All logit filters in OpenAI's order: blank, suppress tokens, timestamp rules; with
    ``hold`` (int32 ``[batch]``), end-of-text held back until a timestamp reaches it
    (:func:`~whisperjax_cli.timestamps.hold_end_of_text`), before the timestamp rules."""
    logits = suppress_at_begin(logits, begin_mask, cur, sample_begin)
    logits = suppress(logits, suppress_mask)
    if config.timestamps is not None:
        if hold is not None:
            logits = hold_end_of_text(logits, tokens, cur, sample_begin, config.timestamps, hold)
        logits = apply_timestamp_rules(logits, tokens, cur, sample_begin, config.timestamps)
    return logits


def first_argmax(x: Array) -> Array:
    """``jnp.argmax(x, axis=-1)`` (the first maximum) as two plain reductions, int32.

    XLA:CPU runs argmax as one variadic (value, index) reduction: 1.05 ms over a batch-8 row of
    logits, 0.26 ms as a max and then a min over the indices holding it.
    """
    ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
    top = jnp.max(x, axis=-1, keepdims=True)
    return jnp.minimum(jnp.min(jnp.where(x == top, ids, x.shape[-1]), axis=-1), x.shape[-1] - 1)


SAMPLE_BLOCK = 256  # vocabulary entries per block of sample_categorical's two-level search


def sample_categorical(key: Array, logits: Array) -> Array:
    """One token per row from ``softmax(logits)`` by inverting the CDF.

    One uniform number per row instead of ``jax.random.categorical``'s Gumbel noise over the
    whole vocabulary, which costed more than the model's step on CPU. The CDF is inverted in
    two levels, first over the probability mass of blocks of ``SAMPLE_BLOCK`` entries, then
    within the block drawn: XLA:CPU's cumulative sum over the whole vocabulary took 1.4 ms for
    5 rows, this 0.45. Masked (-inf) entries have zero mass, so they are never drawn.
    """
    batch, vocab = logits.shape
    blocks = -(-vocab // SAMPLE_BLOCK)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.pad(probs, ((0, 0), (0, blocks * SAMPLE_BLOCK - vocab))).reshape(batch, blocks, SAMPLE_BLOCK)
    mass = jnp.sum(probs, axis=-1)  # [batch, blocks]
    cdf = jnp.cumsum(mass, axis=-1)
    u = jax.random.uniform(key, (batch, 1), dtype=cdf.dtype) * cdf[:, -1:]
    block = jnp.minimum(jnp.sum(cdf < u, axis=-1), blocks - 1)  # the first block whose cdf reaches u
    before = jnp.take_along_axis(cdf - mass, block[:, None], axis=1)  # mass of the blocks before it
    inner = jnp.cumsum(jnp.take_along_axis(probs, block[:, None, None], axis=1)[:, 0], axis=-1) + before
    token = block * SAMPLE_BLOCK + jnp.sum(inner < u, axis=-1)
    return jnp.minimum(token, vocab - 1).astype(jnp.int32)


def repeats_itself(tokens: Array, last: Array, sample_begin: Array, span: int,
                   max_period: int = LOOP_MAX_PERIOD, timestamp_begin: Optional[int] = None) -> Array:
    """True for rows whose last ``span`` sampled tokens (up to slot ``last``) equal the ``span``
    tokens ``p`` slots earlier, for some period ``p <= max_period`` ("au.au.au.", "2H.2H.2H.").

    Such a row is stuck: left alone it runs to ``sample_len`` tokens, fails the compression
    check and is decoded again at the next temperature, so its last ~150 steps are wasted.
    With ``timestamp_begin``, every timestamp counts as the same token: a loop of timestamped
    segments (" S.<|4.20|><|4.20|> S.<|4.60|>...") has rising times, never equal tokens, and
    ran up to 224 tokens at every temperature before.
    """
    width = span + max_period
    window = jax.lax.dynamic_slice_in_dim(tokens, last - width + 1, width, axis=1)  # [batch, width]
    if timestamp_begin is not None:
        window = jnp.minimum(window, timestamp_begin)
    tail = window[:, max_period:]
    periodic = jnp.zeros((tokens.shape[0],), bool)
    for p in range(1, max_period + 1):
        periodic = periodic | jnp.all(tail == window[:, max_period - p : width - p], axis=1)
    return periodic & (last - sample_begin + 1 >= width)  # every token compared was sampled


def loop_start(tokens: np.ndarray, timestamp_begin: int) -> int:
    """Where the repetition that a looping row ended in begins (every timestamp counted as
    the same token, as :func:`repeats_itself`, on the host); ``len(tokens)`` if
    its last ``LOOP_SPAN`` tokens do not repeat."""
    t = np.minimum(tokens, timestamp_begin)
    n = len(t)
    for p in range(1, LOOP_MAX_PERIOD + 1):
        if n >= LOOP_SPAN + p and np.array_equal(t[n - LOOP_SPAN :], t[n - LOOP_SPAN - p : n - p]):
            start = n - LOOP_SPAN - p
            while start > 0 and t[start - 1] == t[start - 1 + p]:
                start -= 1
            return start
    return n


def loops(tokens: Array, last: Array, sample_begin: Array, config: LoopConfig) -> Array:
    """:func:`repeats_itself` with the loop settings of ``config`` (timestamps alike)."""
    ts = config.timestamps.timestamp_begin if config.timestamps is not None else None
    return repeats_itself(tokens, last, sample_begin, config.loop_span, timestamp_begin=ts)


def decode_loop(
    step_fn: Callable[[Array, KVCache, Array], tuple[Array, KVCache]],
    state: LoopState,
    sample_begin: Array,
    suppress_mask: Array,
    begin_mask: Array,
    temperature: Array,
    config: LoopConfig,
    stop_at_active: int = 0,
    hold: Optional[Array] = None,
) -> LoopState:
    """Samples until every row has produced end-of-text or ``sample_len`` tokens.

    Args:
      step_fn: ``(tokens [batch, 1], cache, index) -> (logits [batch, vocab], cache)``.
      state: the state after the prompt: ``cur == sample_begin``, ``logits`` for that slot.
      temperature: float32 scalar, used when ``config.sample`` (greedy otherwise).
      stop_at_active: also stop once at most this many rows are unfinished (see
        :func:`decode_phases`); ``state.logits`` then hold the next slot's logits of every row.
      hold: int32 ``[batch]`` or None, see :func:`filter_logits`.
    """
    end = sample_begin + config.sample_len

    def cond(s: LoopState):
        return (s.cur < end) & (jnp.sum(~s.done) > stop_at_active)

    def body(s: LoopState) -> LoopState:
        logits = filter_logits(s.logits, s.tokens, s.cur, sample_begin, suppress_mask, begin_mask, config, hold)
        key = s.key
        if config.sample:
            key, sub = jax.random.split(s.key)
            token = sample_categorical(sub, logits / temperature)
        else:
            token = first_argmax(logits)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        token_logprob = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
        sum_logprobs = s.sum_logprobs + jnp.where(s.done, 0.0, token_logprob)
        token = jnp.where(s.done, config.eot, token)
        tokens = jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.cur))
        done = s.done | (token == config.eot)
        looped = s.looped
        if config.loop_span:
            looped = looped | (~done & loops(tokens, s.cur, sample_begin, config))
            done = done | looped
        # The model runs even when this step finished every row (one spare call per loop, whose
        # logits nobody reads): skipping it with lax.cond made XLA copy the whole cache at every
        # step, 20 % of a batch-8 step. The slot written is inside the buffer (cur < end).
        next_logits, cache = step_fn(token[:, None], s.cache, s.cur)
        return LoopState(tokens, s.cur + 1, next_logits, cache, sum_logprobs, done, key, looped)

    return jax.lax.while_loop(cond, body, state)


def phase_sizes(batch: int) -> tuple[int, ...]:
    """Batch sizes the decode loop shrinks through: ``8 -> (8, 4, 2, 1)``, ``5 -> (5, 2, 1)``."""
    sizes = [batch]
    while sizes[-1] > 1:
        sizes.append(sizes[-1] // 2)
    return tuple(sizes)


def decode_phases(module: Whisper, params, state: LoopState, pad: Array, group: int, sample_begin: Array,
                  suppress_mask: Array, begin_mask: Array, temperature: Array, config: LoopConfig,
                  hold: Optional[Array] = None) -> LoopState:
    """:func:`decode_loop`, moving the unfinished rows into ever smaller batches.

    A row that runs to ``sample_len`` (a repetition loop) would keep the whole batch stepping
    long after the others ended; instead each phase stops once its unfinished rows fit the
    next size of :func:`phase_sizes`, and the next phase continues with just those rows (their
    tokens, logits and cache gathered, audio keys/values per row). Finished rows are written
    back into the full-size state, whose tokens are returned. Every phase is part of the one
    jitted program; a batch of one has a single phase.
    """
    sizes = phase_sizes(state.tokens.shape[0])
    full_tokens, full_sums, full_looped = state.tokens, state.sum_logprobs, state.looped
    rows = jnp.arange(sizes[0])  # the full-batch row of each row of `state`
    for i, size in enumerate(sizes):
        if i:
            keep = jnp.argsort(state.done, stable=True)[:size]  # unfinished rows first
            rows = rows[keep]
            audio_rows = rows // group if i == 1 else keep  # group rows share one audio in phase 0
            cache = take_rows(state.cache, keep, audio_rows)
            state = LoopState(state.tokens[keep], state.cur, state.logits[keep], cache, state.sum_logprobs[keep],
                              state.done[keep], state.key, state.looped[keep])
        stop = sizes[i + 1] if i + 1 < len(sizes) else 0
        state = decode_loop(_model_step(module, params, pad[rows]), state, sample_begin, suppress_mask,
                            begin_mask, temperature, config, stop, None if hold is None else hold[rows])
        full_tokens = full_tokens.at[rows].set(state.tokens)
        full_sums = full_sums.at[rows].set(state.sum_logprobs)
        full_looped = full_looped.at[rows].set(state.looped)
    return state.replace(tokens=full_tokens, sum_logprobs=full_sums, looped=full_looped)


def _model_step(module: Whisper, params, pad: Array):
    def step(token, cache, index):
        logits, cache = module.apply({"params": params}, token, cache, index, pad, method="decode")
        return logits[:, -1], cache

    return step


def prefill(module: Whisper, params, prompt: Array, cache: KVCache, pad: Array, sot_index: Array,
            config: LoopConfig) -> tuple[Array, KVCache, Array]:
    """Runs the prompt through the cache; returns the next logits, the cache and the
    no-speech probability (read at start-of-transcript, as OpenAI). Only those two positions
    are projected onto the vocabulary."""
    at = jnp.stack([jnp.asarray(sot_index, jnp.int32), jnp.int32(prompt.shape[1] - 1)])
    logits, cache = module.apply({"params": params}, prompt, cache, jnp.int32(0), pad, at, method="decode")
    if config.no_speech is None:
        no_speech_prob = jnp.zeros((prompt.shape[0],), jnp.float32)
    else:
        no_speech_prob = jax.nn.softmax(logits[:, 0], axis=-1)[:, config.no_speech]
    return logits[:, 1], cache, no_speech_prob


@stored_jit(static_argnames=("module", "config"))
def decode_window(module: Whisper, params, inputs: DecodeInputs, config: LoopConfig) -> DecodeOutput:
    """Decodes a batch of audio windows after their (left-padded) prompts.

    Args:
      module: the model (static).
      params: its parameters.
      inputs: audio, prompts, masks, temperature and key (:class:`DecodeInputs`).
      config: static loop settings (``config.beam`` None: beam search is
        :func:`~whisperjax_cli.beam.beam_search_window`, same arguments).
    """
    assert config.beam is None, "beam search runs in beam.beam_search_window"
    audio, prompt, pad, group, hold = inputs.audio, inputs.prompt, inputs.pad, config.group, inputs.hold
    batch, prompt_len = prompt.shape
    cross = module.apply({"params": params}, audio, method="cross_kv")
    # A group's rows share their prompt: it is run once per audio and its cache rows repeated.
    cache = init_cache(module.dims, cross, prompt_len + config.sample_len, module.dtype)
    last_logits, cache, no_speech_prob = prefill(module, params, prompt[::group], cache, pad[::group],
                                                 inputs.sot_index, config)
    if group > 1:
        cache = repeat_rows(cache, group)
        last_logits, no_speech_prob = jnp.repeat(last_logits, group, 0), jnp.repeat(no_speech_prob, group, 0)
    state = LoopState(
        tokens=jnp.concatenate([prompt, jnp.full((batch, config.sample_len), config.eot, jnp.int32)], axis=1),
        cur=jnp.int32(prompt_len),
        logits=last_logits,
        cache=cache,
        sum_logprobs=jnp.zeros((batch,), jnp.float32),
        done=jnp.zeros((batch,), bool),
        key=inputs.key,
        looped=jnp.zeros((batch,), bool),
    )
    state = decode_phases(module, params, state, pad, group, jnp.int32(prompt_len), inputs.suppress_mask,
                          inputs.begin_mask, inputs.temperature, config, hold)
    return DecodeOutput(state.tokens[:, prompt_len:], state.sum_logprobs, no_speech_prob, state.looped,
                        cross if config.keep_cross else None)


ENCODE_CHUNK = 2  # windows per encoder pass; bigger batches run one chunk after another


@stored_jit(static_argnames=("module",))
def encode(module: Whisper, params, mel: Array, rows: Optional[Array] = None) -> Array:
    """Encoder output ``[batch, n_audio_ctx, state]`` for mel ``[batch, frames, n_mels]``.

    Batches run ``ENCODE_CHUNK`` windows at a time, one chunk after another: the activations
    of 8 windows at once overflow the CPU's caches, and a window cost 0.59 s at batch 8 against
    0.31 s at batch 1 or 2 (tiny.en, 2 cores). Each window's result is the same either way.

    ``rows`` (an int32 scalar, traced): only the chunks holding windows ``[0, rows)`` are
    encoded and the rest of the output is zeros, so a batch padded up to its bucket costs its
    real windows rounded up to a chunk, with the one program of the bucket (batch 8, tiny.en,
    2 cores: 6.07 s for 8 rows, 4.43 s for 5, 1.53 s for 1).
    """
    run = lambda m: module.apply({"params": params}, m, method="encode")  # noqa: E731
    batch = mel.shape[0]
    chunk = ENCODE_CHUNK if batch % ENCODE_CHUNK == 0 else 1
    if batch <= chunk:
        return run(mel)
    chunks = mel.reshape(batch // chunk, chunk, *mel.shape[1:])
    out = jax.eval_shape(run, chunks[0])
    out = jnp.zeros((batch // chunk, *out.shape), out.dtype)
    todo = batch // chunk if rows is None else (jnp.minimum(rows, batch) + chunk - 1) // chunk
    out = jax.lax.fori_loop(0, todo, lambda i, o: o.at[i].set(run(chunks[i])), out)
    return out.reshape(batch, *out.shape[2:])
