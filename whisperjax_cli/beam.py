"""Beam search over the explicit KV cache: OpenAI's ``BeamSearchDecoder`` + ``MaximumLikelihoodRanker``.

One jitted ``lax.while_loop`` over a :class:`BeamState` pytree. Each audio row runs ``beam_size``
beams (rows ``b * beam_size + j``); reordering beams is a gather on the cache pytree and the token
buffer. Finished sequences live in fixed-shape arrays ``[batch, slots, sample_len]``, so the whole
search, ``finalize`` and the ranking stay inside the jit. As in ``decoding.decode_loop``, the model
call is passed in as ``step_fn``, so the search can be tested with a scripted stub.

Reference: ``whisper/decoding.py`` (``BeamSearchDecoder.update``/``finalize``,
``MaximumLikelihoodRanker.rank``, ``DecodingTask.run``) at openai/whisper c0d2f62. This is not
CTranslate2's search (faster-whisper): that one finishes only end-of-text candidates among its top
``beam_size``, so the two occasionally pick different sequences (see tests/test_beam.py). With
``finish_top_only`` this search uses that rule, which transcription does: under OpenAI's rule,
weak early endings can fill the finished set and cut a long-form window to a word.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Optional

import jax
import jax.numpy as jnp

from whisperjax_cli.decode_types import pytree_dataclass
from whisperjax_cli.decoding import DecodeInputs, DecodeOutput, LoopConfig, filter_logits, loops, prefill
from whisperjax_cli.kv_cache import init_cache, take_rows, take_slots
from whisperjax_cli.programs import stored_jit

if TYPE_CHECKING:
    from whisperjax_cli.model import Whisper

SLOT_BLOCK = 16  # beams reorder their self-attention buffers in blocks of this many slots

Array = jax.Array


@pytree_dataclass
class BeamState:
    tokens: Array  # int32 [batch * beam, buffer]: prompt, the beam's sampled tokens, end-of-text after
    cur: Array  # int32 scalar: the next slot to write
    logits: Array  # float32 [batch * beam, vocab]: logits for slot `cur`
    cache: Any  # the step function's cache pytree, every leaf with rows [batch * beam, ...]
    sum_logprobs: Array  # float32 [batch * beam]: running score of each beam
    fin_tokens: Array  # int32 [batch, slots, sample_len]: finished sequences, end-of-text then padding
    fin_scores: Array  # float32 [batch, slots]: their sums of logprobs (end-of-text included)
    fin_count: Array  # int32 [batch]: filled slots, in OpenAI's insertion order
    looped: Array  # bool [batch]: stopped early, its best beam repeating itself (config.loop_span)


def max_candidates(beam_size: int, patience: Optional[float]) -> int:
    """OpenAI's ``round(beam_size * patience)`` finished sequences to collect (Python rounding)."""
    n = round(beam_size * (patience or 1.0))
    if n <= 0:
        raise ValueError(f"beam_size * patience must round to at least 1, not {n}")
    return n


def rank_candidates(logprobs: Array, sum_logprobs: Array, first_step: Array, beam: int):
    """Every beam's top ``beam + 1`` extensions per audio, best first (OpenAI's STEP 1 and sort).

    At the first step all beams of an audio hold the same prefix; OpenAI's dict keyed by the
    sequence keeps one copy, so here only beam 0's candidates are valid then. Ties keep insertion
    order (beam, then top-k rank), as Python's stable ``sorted(..., reverse=True)`` does.

    Returns:
      ``(scores, source, token, valid)``, each ``[batch, beam * (beam + 1)]``; ``source`` is the
      global row of the candidate's beam.
    """
    n = logprobs.shape[0]
    batch, c = n // beam, beam * (beam + 1)
    top_logprobs, top_tokens = jax.lax.top_k(logprobs, beam + 1)  # [n, beam + 1]
    scores = (sum_logprobs[:, None] + top_logprobs).reshape(batch, c)
    tokens = top_tokens.reshape(batch, c)
    source = jnp.repeat(jnp.arange(n, dtype=jnp.int32), beam + 1).reshape(batch, c)
    duplicate = first_step & (source % beam != 0)  # [batch, c]
    insertion = jnp.broadcast_to(jnp.arange(c), (batch, c))
    _, _, order = jax.lax.sort((duplicate.astype(jnp.int32), -scores, insertion), dimension=1, num_keys=3)
    take = lambda x: jnp.take_along_axis(x, order, axis=1)  # noqa: E731
    return take(scores), take(source), take(tokens), ~take(duplicate)


def take_leading(cache: Any, rows: Array) -> Any:
    """Rows ``rows`` of every leaf of ``cache`` (rows on the leading axis)."""
    return jax.tree_util.tree_map(lambda x: x[rows], cache)


def _sampled(tokens: Array, sample_begin: Array, sample_len: int) -> Array:
    """The sampled part ``[rows, sample_len]`` of the token buffer (end-of-text after the last)."""
    return jax.lax.dynamic_slice_in_dim(tokens, sample_begin, sample_len, axis=1)


def _add_finished(s: BeamState, rows: Array, scores: Array, add: Array, sample_begin, sample_len, limit):
    """Appends candidates where ``add`` (in order) to each audio's finished set, up to ``limit``.

    ``rows``, ``scores``, ``add`` are ``[batch, c]``: the buffer row holding each sequence (its
    end-of-text slot is still unwritten, hence already end-of-text), its score, whether to add it.
    """
    batch, slots = s.fin_scores.shape
    slot = s.fin_count[:, None] + jnp.cumsum(add, axis=1) - 1  # [batch, c]
    keep = add & (slot < limit)
    slot = jnp.where(keep, slot, slots)  # out of range: dropped by the scatter
    audio = jnp.broadcast_to(jnp.arange(batch)[:, None], slot.shape)
    sequences = _sampled(s.tokens, sample_begin, sample_len)[rows]  # [batch, c, sample_len]
    return s.replace(
        fin_tokens=s.fin_tokens.at[audio, slot].set(sequences, mode="drop"),
        fin_scores=s.fin_scores.at[audio, slot].set(scores, mode="drop"),
        fin_count=s.fin_count + keep.sum(axis=1).astype(jnp.int32),
    )


def beam_loop(
    step_fn: Callable[[Array, Any, Array], tuple[Array, Any]],
    state: BeamState,
    sample_begin: Array,
    suppress_mask: Array,
    begin_mask: Array,
    config: LoopConfig,
    n_finished: int,
    take: Callable[[Any, Array], Any] = take_leading,
    reorder: Optional[Callable[[Any, Array, Array, Array], Any]] = None,
    hold: Optional[Array] = None,
) -> BeamState:
    """Runs OpenAI's ``BeamSearchDecoder.update`` until every audio has ``n_finished`` finished
    sequences or ``sample_len`` tokens were sampled.

    With ``config.loop_span``, an audio also stops once its best beam repeats itself
    (:func:`~whisperjax_cli.decoding.loops`, as greedy decoding's rows): OpenAI's
    search would run such a window to ``sample_len`` (224 steps of every beam) and most often
    pick the loop, which fails the compression check. Its beams are then frozen and ``looped``
    is set; :func:`beam_search` marks the result looped when a running beam wins the ranking.

    Args:
      step_fn: ``(tokens [rows, 1], cache, index) -> (logits [rows, vocab], cache)``.
      state: the state after the prompt, rows already repeated ``beam`` times, no finished ones.
      n_finished: OpenAI's ``max_candidates``.
      take: ``(cache, rows) -> cache`` of those rows (default: every leaf indexed on its first axis).
      reorder: ``(cache, rows, start, stop) -> cache``: ``take`` for caches that differ between
        an audio's beams only at slots ``[start, stop)`` (those sampled so far); default ``take``.
    """
    beam, finish_top_only = config.beam.beam_size, config.beam.finish_top_only
    end = sample_begin + config.sample_len
    if reorder is None:
        reorder = lambda cache, rows, start, stop: take(cache, rows)  # noqa: E731
    rows = state.tokens.shape[0]

    def complete(s: BeamState) -> Array:
        return jnp.all((s.fin_count >= n_finished) | s.looped)

    def cond(s: BeamState):
        return (s.cur < end) & ~complete(s)

    def body(s: BeamState) -> BeamState:
        logits = filter_logits(s.logits, s.tokens, s.cur, sample_begin, suppress_mask, begin_mask, config, hold)
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        scores, source, token, valid = rank_candidates(logprobs, s.sum_logprobs, s.cur == sample_begin, beam)
        live = valid & (token != config.eot)
        live_rank = jnp.cumsum(live, axis=1) - 1  # [batch, c]
        # [batch, beam]: the position of the k-th live candidate continues as beam k.
        pick = jnp.argmax(live[:, None, :] & (live_rank[:, None, :] == jnp.arange(beam)[None, :, None]), axis=2)
        # OpenAI stops scanning at the last continuing candidate: end-of-text candidates ranked
        # above it finish at this step. With ``finish_top_only`` (CTranslate2's rule) only those
        # among the top ``beam`` finish, so weak early endings cannot fill the finished set
        # before the best beam ends (over long-form audio those cut windows to " and").
        bound = jnp.full_like(pick[:, -1:], beam) if finish_top_only else pick[:, -1:]
        finished = valid & (token == config.eot) & (jnp.arange(scores.shape[1]) < bound) & ~s.looped[:, None]
        s = _add_finished(s, source, scores, finished, sample_begin, config.sample_len, n_finished)

        gather = lambda x: jnp.take_along_axis(x, pick, axis=1).reshape(rows)  # noqa: E731
        src, token, sum_logprobs = gather(source), gather(token), gather(scores)
        tokens = jax.lax.dynamic_update_slice(s.tokens[src], token[:, None], (0, s.cur))
        looped = s.looped
        if config.loop_span:
            frozen = jnp.repeat(s.looped, beam)  # a looped audio's beams keep what they had
            tokens = jnp.where(frozen[:, None], s.tokens, tokens)
            sum_logprobs = jnp.where(frozen, s.sum_logprobs, sum_logprobs)
            best = tokens[::beam]  # beam 0 of each audio: its best live candidate
            looped = looped | ((s.fin_count < n_finished) & loops(best, s.cur, sample_begin, config))
        cache = reorder(s.cache, src, sample_begin, s.cur)
        s = s.replace(tokens=tokens, cur=s.cur + 1, sum_logprobs=sum_logprobs, looped=looped)
        # The model runs even after the last step (one spare call, as decoding.decode_loop):
        # skipping it with lax.cond made XLA copy every buffer at every step, 7 ms of 31.
        next_logits, cache = step_fn(token[:, None], cache, s.cur - 1)
        return s.replace(logits=next_logits, cache=cache)

    return jax.lax.while_loop(cond, body, state)


def finalize(s: BeamState, sample_begin: Array, sample_len: int, beam: int) -> BeamState:
    """OpenAI's ``finalize``: an audio with fewer than ``beam`` finished sequences gets its running
    beams, best first (``argsort(...)[::-1]``: ties take the later beam), until it has ``beam``."""
    batch = s.fin_count.shape[0]
    scores = s.sum_logprobs.reshape(batch, beam)
    later = jnp.broadcast_to(-jnp.arange(beam), (batch, beam))
    _, neg_order = jax.lax.sort((-scores, later), dimension=1, num_keys=2)
    rows = -neg_order + beam * jnp.arange(batch)[:, None]  # [batch, beam] global rows, best first
    ranked = jnp.take_along_axis(scores, -neg_order, axis=1)
    add = jnp.arange(beam)[None, :] < (beam - s.fin_count)[:, None]
    return _add_finished(s, rows, ranked, add, sample_begin, sample_len, beam)


def rank_finished(s: BeamState, eot: int, length_penalty: Optional[float]) -> tuple[Array, Array, Array]:
    """``MaximumLikelihoodRanker``: the best finished sequence per audio by sum_logprob / penalty.

    The length is the number of tokens before end-of-text; the penalty is the length itself, or
    ``((5 + length) / 6) ** length_penalty`` (Google NMT). Ties take the earliest slot (np.argmax).

    Returns:
      ``(tokens int32 [batch, sample_len], sum_logprobs float32 [batch], slot int32 [batch])``.
    """
    is_eot = s.fin_tokens == eot  # [batch, slots, sample_len]
    length = jnp.where(is_eot.any(axis=-1), jnp.argmax(is_eot, axis=-1), is_eot.shape[-1]).astype(jnp.float32)
    penalty = length if length_penalty is None else ((5.0 + length) / 6.0) ** length_penalty
    filled = jnp.arange(s.fin_scores.shape[1])[None, :] < s.fin_count[:, None]
    best = jnp.argmax(jnp.where(filled, s.fin_scores / penalty, -jnp.inf), axis=1)  # [batch]
    tokens = jnp.take_along_axis(s.fin_tokens, best[:, None, None], axis=1)[:, 0]
    return tokens, jnp.take_along_axis(s.fin_scores, best[:, None], axis=1)[:, 0], best


def beam_search(
    step_fn: Callable[[Array, Any, Array], tuple[Array, Any]],
    tokens: Array,
    logits: Array,
    cache: Any,
    sample_begin: Array,
    suppress_mask: Array,
    begin_mask: Array,
    config: LoopConfig,
    take: Callable[[Any, Array], Any] = take_leading,
    reorder: Optional[Callable[[Any, Array, Array, Array], Any]] = None,
    hold: Optional[Array] = None,
) -> tuple[Array, Array, Array]:
    """Beam search for each audio row after its prompt; the best sequence per row.

    Args:
      step_fn: ``(tokens [rows, 1], cache, index) -> (logits [rows, vocab], cache)`` over
        ``batch * beam_size`` rows (row ``b * beam_size + j`` is beam ``j`` of audio ``b``).
      tokens: int32 ``[batch, buffer]``: the prompt up to ``sample_begin``, end-of-text after.
      logits: float32 ``[batch, vocab]`` for slot ``sample_begin``.
      cache: the cache pytree after the prompt, leaves with rows ``[batch, ...]``.
      sample_begin: int32 scalar, the first sampled slot.
      config: static loop settings (``sample_len``, ``eot``, timestamp rules).
      take: ``(cache, rows) -> cache`` of those rows: repeats each row for its beams, then
        reorders beams at every step (unless ``reorder``, see :func:`beam_loop`).
    Returns:
      ``(tokens int32 [batch, sample_len]`` sampled tokens then end-of-text,
      ``sum_logprobs float32 [batch]``, ``looped bool [batch])``: the search stopped on a loop
      (see :func:`beam_loop`) and a beam still running then was ranked best.
    """
    batch = tokens.shape[0]
    beam_size, length_penalty = config.beam.beam_size, config.beam.length_penalty
    n_finished = max_candidates(beam_size, config.beam.patience)
    slots = max(n_finished, beam_size)  # finalize may fill up to beam_size
    repeat = lambda x: jnp.repeat(x, beam_size, axis=0)  # noqa: E731
    state = BeamState(
        tokens=repeat(tokens),
        cur=jnp.asarray(sample_begin, jnp.int32),
        logits=repeat(logits),
        cache=take(cache, jnp.repeat(jnp.arange(batch), beam_size)),
        sum_logprobs=jnp.zeros((batch * beam_size,), jnp.float32),
        fin_tokens=jnp.full((batch, slots, config.sample_len), config.eot, jnp.int32),
        fin_scores=jnp.zeros((batch, slots), jnp.float32),
        fin_count=jnp.zeros((batch,), jnp.int32),
        looped=jnp.zeros((batch,), bool),
    )
    beam_hold = None if hold is None else jnp.repeat(hold, beam_size)  # an audio's beams share its hold
    state = beam_loop(step_fn, state, state.cur, suppress_mask, begin_mask, config, n_finished, take, reorder,
                      beam_hold)
    finished = state.fin_count
    state = finalize(state, sample_begin, config.sample_len, beam_size)
    tokens, sum_logprobs, slot = rank_finished(state, config.eot, length_penalty)
    return tokens, sum_logprobs, state.looped & (slot >= finished)


@stored_jit(static_argnames=("module", "config"))
def beam_search_window(module: Whisper, params, inputs: DecodeInputs, config: LoopConfig) -> DecodeOutput:
    """Beam-search decodes a batch of audio windows (``config.beam`` says how); the arguments
    and result of ``decoding.decode_window``.

    The prompt is prefilled once per audio row; the beams of a row share its cross-attention
    keys/values (held constant, read once per step for all beams); reordering beams gathers only
    the self-attention buffers, and of those only the slots sampled so far
    (:func:`~whisperjax_cli.kv_cache.take_slots`): the prompt's are the same for all beams.
    ``inputs.temperature`` and ``inputs.key`` are not read (beam search is at temperature 0).
    """
    beam = config.beam
    beam_size = beam.beam_size
    audio, prompt, pad = inputs.audio, inputs.prompt, inputs.pad
    batch, prompt_len = prompt.shape
    cross = module.apply({"params": params}, audio, method="cross_kv")
    length = -(-(prompt_len + config.sample_len) // SLOT_BLOCK) * SLOT_BLOCK  # whole blocks; the rest masked
    cache = init_cache(module.dims, cross, length, module.dtype)
    last_logits, cache, no_speech_prob = prefill(module, params, prompt, cache, pad, inputs.sot_index, config)

    beam_pad = jnp.repeat(pad, beam_size, axis=0)

    # The loop carries the model's cache as it is (audio keys/values one per audio, shared by its
    # beams) and reorders beams with take_slots. Unfolding the self-attention buffers to
    # [rows, heads, ...] around each model call made XLA copy every buffer at every step: 20 ms
    # a step instead of 14 with a 232-token prompt.
    def step(token, cache, index):
        logits, cache = module.apply({"params": params}, token, cache, index, beam_pad, method="decode")
        return logits[:, -1], cache

    buffer = jnp.concatenate([prompt, jnp.full((batch, config.sample_len), config.eot, jnp.int32)], axis=1)
    tokens, sum_logprobs, looped = beam_search(
        step, buffer, last_logits, cache, jnp.int32(prompt_len),
        inputs.suppress_mask, inputs.begin_mask, config, take_rows, functools.partial(take_slots, block=SLOT_BLOCK),
        inputs.hold,
    )
    return DecodeOutput(tokens, sum_logprobs, no_speech_prob, looped, cross if config.keep_cross else None)
