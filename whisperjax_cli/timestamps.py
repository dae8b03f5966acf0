"""OpenAI's timestamp rules (``ApplyTimestampRules``) as pure, vectorised logit filters.

Every function here runs inside a jitted ``lax.while_loop`` decode step: masks are built with
``jnp.where`` over the whole batch, shapes are static, and the decode position ``cur`` and the
prompt length ``sample_begin`` may be traced scalars, so changing them never recompiles.

The setting, shared by all rules:

* ``tokens: int32[B, T]`` is the decoder's token buffer. Positions ``[0, sample_begin)`` hold the
  forced prompt, ``[sample_begin, cur)`` the tokens sampled so far, and ``[cur, T)`` are unused
  and ignored. OpenAI's growing ``tokens[k, sample_begin:]`` is our ``tokens[k, sample_begin:cur]``.
* ``logits: float[B, V]`` are the scores for position ``cur``. Every id ``>= timestamp_begin`` is a
  timestamp, as in OpenAI's slicing ``logits[:, timestamp_begin:]``, even where V is padded.
* Masked entries are set to ``-inf``, exactly as OpenAI does, so that ``log_softmax`` and the
  sum-of-timestamps comparison see the same values (``-inf > -inf`` is false in both).

Reference: ``whisper/decoding.py::ApplyTimestampRules.apply`` at openai/whisper c0d2f62. Unlike the
HF Flax port (and MLX), this keeps all five rules, including "timestamps never go backwards" and
"the first sampled token is a timestamp".
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class TimestampConfig:
    """Token ids the timestamp rules need. Hashable, so it can be a static jit argument.

    Attributes:
        timestamp_begin: id of ``<|0.00|>``; every id at or above it is a timestamp.
        eot: id of ``<|endoftext|>``; text ids are below it.
        no_timestamps: id of ``<|notimestamps|>``, or None when the vocabulary has none.
        max_initial_timestamp_index: latest timestamp index allowed as the first sampled token,
            or None for no limit. OpenAI's default is round(1.0 s / 0.02 s) = 50.
    """

    timestamp_begin: int
    eot: int
    no_timestamps: Optional[int]
    max_initial_timestamp_index: Optional[int] = 50


def _ids(logits: jax.Array) -> jax.Array:
    """Vocabulary ids, shaped to broadcast against ``logits``: ``[1, V]``."""
    return jnp.arange(logits.shape[-1], dtype=jnp.int32)[None, :]


def _history(tokens: jax.Array, cur, sample_begin, cfg: TimestampConfig):
    """Per-row facts about the sampled tokens ``tokens[:, sample_begin:cur]``.

    Returns:
        ``(last_was_ts, penult_was_ts, has_ts, last_ts)``, each ``[B, 1]``: whether the last and
        the second-to-last sampled tokens are timestamps (OpenAI's convention: fewer than two
        sampled tokens counts as "penultimate was a timestamp"), whether any sampled token is a
        timestamp, and the id of the latest such timestamp (meaningless where ``has_ts`` is false).
    """
    cur = jnp.asarray(cur, jnp.int32)
    sample_begin = jnp.asarray(sample_begin, jnp.int32)
    n_sampled = cur - sample_begin
    t = tokens.shape[1]
    is_ts = tokens >= cfg.timestamp_begin  # [B, T]
    # Clipped indices: when fewer tokens were sampled the length tests below decide instead.
    last_tok_is_ts = is_ts[:, jnp.clip(cur - 1, 0, t - 1)]  # [B]
    penult_tok_is_ts = is_ts[:, jnp.clip(cur - 2, 0, t - 1)]  # [B]
    last_was_ts = (n_sampled >= 1) & last_tok_is_ts
    penult_was_ts = (n_sampled < 2) | penult_tok_is_ts

    pos = jnp.arange(t, dtype=jnp.int32)  # [T]
    sampled_ts = is_ts & (pos >= sample_begin) & (pos < cur)  # [B, T]
    has_ts = sampled_ts.any(axis=1)  # [B]
    last_ts_pos = jnp.max(jnp.where(sampled_ts, pos, 0), axis=1)  # [B]
    last_ts = jnp.take_along_axis(tokens, last_ts_pos[:, None], axis=1)[:, 0]  # [B]
    return (last_was_ts[:, None], penult_was_ts[:, None], has_ts[:, None], last_ts[:, None])


def suppress_no_timestamps(logits, tokens, cur, sample_begin, cfg: TimestampConfig):
    """Rule 1: never sample ``<|notimestamps|>``.

    Why: in timestamp mode the model must not switch itself to text-only mode mid-decode; the
    no-timestamp mode is chosen up front by forcing that token in the prompt instead.
    """
    del tokens, cur, sample_begin
    if cfg.no_timestamps is None:
        return logits
    return jnp.where(_ids(logits) == cfg.no_timestamps, NEG_INF, logits)


def timestamps_in_pairs(logits, tokens, cur, sample_begin, cfg: TimestampConfig):
    """Rule 2: timestamps come in (start, end) pairs, except a lone one directly before EOT.

    Why: a segment is ``<|start|> text <|end|>``. After two timestamps in a row (an end then a
    start, or the very first start) the next token must be text, so all timestamps are masked.
    After a single timestamp that closed a segment's text, the next token must be a timestamp
    (the next start) or EOT, so all text before EOT is masked.
    """
    last_was_ts, penult_was_ts, _, _ = _history(tokens, cur, sample_begin, cfg)
    ids = _ids(logits)
    mask = (last_was_ts & penult_was_ts & (ids >= cfg.timestamp_begin)) | (
        last_was_ts & ~penult_was_ts & (ids < cfg.eot)
    )
    return jnp.where(mask, NEG_INF, logits)


def timestamps_monotonic(logits, tokens, cur, sample_begin, cfg: TimestampConfig):
    """Rule 3: timestamps never decrease, and a segment never has zero length.

    Why: going backwards in time makes the long-form seek loop repeat audio, and an empty segment
    (``<|t|> text <|t|>``) can loop forever. Right after a segment's end timestamp the next start
    may equal it (OpenAI masks ``[timestamp_begin, last)``); anywhere else, notably an end after
    a segment's text, it must be strictly later (mask ``[timestamp_begin, last + 1)``).
    """
    last_was_ts, penult_was_ts, has_ts, last_ts = _history(tokens, cur, sample_begin, cfg)
    limit = jnp.where(last_was_ts & ~penult_was_ts, last_ts, last_ts + 1)  # [B, 1]
    ids = _ids(logits)
    mask = has_ts & (ids >= cfg.timestamp_begin) & (ids < limit)
    return jnp.where(mask, NEG_INF, logits)


def initial_timestamp(logits, tokens, cur, sample_begin, cfg: TimestampConfig):
    """Rule 4: the first sampled token is a timestamp no later than the max initial one.

    Why: a transcript opens with its first segment's start time; without this the model may start
    with text (losing the segment structure) or jump far into the window and skip speech.
    """
    del tokens
    first_step = jnp.asarray(cur, jnp.int32) == jnp.asarray(sample_begin, jnp.int32)
    ids = _ids(logits)
    mask = ids < cfg.timestamp_begin
    if cfg.max_initial_timestamp_index is not None:
        mask = mask | (ids > cfg.timestamp_begin + cfg.max_initial_timestamp_index)
    return jnp.where(first_step & mask, NEG_INF, logits)


def timestamp_if_probable(logits, tokens, cur, sample_begin, cfg: TimestampConfig):
    """Rule 5: sample a timestamp when timestamps together outweigh every single text token.

    Why: probability mass spread over many neighbouring timestamps can lose to one text token
    under greedy decoding although "some timestamp" is the likeliest next event, which would drop
    segment boundaries. Compares ``logsumexp(logprobs[ts:])`` with ``max(logprobs[:ts])`` after
    rules 1-4, in float32 as OpenAI does; all ``-inf`` on either side never fires the rule.
    """
    del tokens, cur, sample_begin
    ts = cfg.timestamp_begin
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, V]
    timestamp_logprob = jax.nn.logsumexp(logprobs[:, ts:], axis=-1)  # [B]
    max_text_logprob = jnp.max(logprobs[:, :ts], axis=-1)  # [B]
    fire = (timestamp_logprob > max_text_logprob)[:, None]  # [B, 1]
    return jnp.where(fire & (_ids(logits) < ts), NEG_INF, logits)


def hold_end_of_text(logits, tokens, cur, sample_begin, cfg: TimestampConfig, until):
    """Not one of OpenAI's rules: no end-of-text before a sampled timestamp reaches ``until``.

    ``until``: int32 ``[B]``, a timestamp index per row (0: no hold). Batched mode ends its
    windows at gaps and knows where each one's sound ends; there the model's end-of-text after
    a closed segment, with words still to come, drops them (tiny.en on the long-form benchmark:
    2-15 s at the end of several windows, WER 28.4 % against 24.8 % held back). Held back, the
    model closes its segment with a timestamp and goes on with the next one, as after any other.
    """
    _, _, has_ts, last_ts = _history(tokens, cur, sample_begin, cfg)
    reached = jnp.where(has_ts, last_ts - cfg.timestamp_begin, 0)  # [B, 1]
    return jnp.where((reached < until[:, None]) & (_ids(logits) == cfg.eot), NEG_INF, logits)


def apply_timestamp_rules(logits, tokens, cur, sample_begin, cfg: TimestampConfig):
    """Applies OpenAI's ``ApplyTimestampRules`` to the logits of position ``cur``.

    Args:
        logits: ``float[B, V]`` scores for the next token, after any earlier filters.
        tokens: ``int32[B, T]`` token buffer; only ``tokens[:, sample_begin:cur]`` is read as
            history (``[0, sample_begin)`` is the prompt, ``[cur, T)`` is ignored).
        cur: int32 scalar, may be traced: the position being sampled (same for every row).
        sample_begin: int32 scalar, may be traced: the first sampled position.
        cfg: the static token ids and max initial timestamp.

    Returns:
        ``logits`` with disallowed ids set to ``-inf``, same shape and dtype.
    """
    # OpenAI's order; rules 1-4 only mask, so only the sum rule depends on running last.
    for rule in (
        suppress_no_timestamps,
        timestamps_in_pairs,
        timestamps_monotonic,
        initial_timestamp,
        timestamp_if_probable,
    ):
        logits = rule(logits, tokens, cur, sample_begin, cfg)
    return logits
