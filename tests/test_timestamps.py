"""Timestamp rules: hand-computed masks per rule, and parity with OpenAI's ApplyTimestampRules.

The parity reference below is a per-row numpy transcription of
``whisper/decoding.py::ApplyTimestampRules.apply`` (openai/whisper c0d2f62), run on
``tokens[:, :cur]`` so that it sees OpenAI's growing token tensor.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from whisperjax_cli.timestamps import (
    TimestampConfig,
    apply_timestamp_rules,
    hold_end_of_text,
    initial_timestamp,
    suppress_no_timestamps,
    timestamp_if_probable,
    timestamps_in_pairs,
    timestamps_monotonic,
)

# A small vocabulary laid out like Whisper's: text ids, then EOT, specials, <|notimestamps|>,
# then timestamps to the end of the vocabulary.
EOT, SOT, NO_TS, TS = 10, 11, 12, 13
CFG = TimestampConfig(
    timestamp_begin=TS, eot=EOT, no_timestamps=NO_TS, max_initial_timestamp_index=5
)
N_TS = 101  # <|0.00|> .. <|2.00|>
V = TS + N_TS


def ts(seconds: float) -> int:
    """The token id of a timestamp at 0.02 s per step."""
    return TS + round(seconds / 0.02)


# ----------------------------------------------------------------------------- the reference


def _np_log_softmax(x):
    x = x.astype(np.float64)
    m = np.max(x)
    shifted = x - m
    return shifted - np.log(np.sum(np.exp(shifted)))


def _np_logsumexp(x):
    m = np.max(x)
    if np.isneginf(m):
        return -np.inf
    return m + np.log(np.sum(np.exp(x - m)))


def openai_apply(logits, tokens, sample_begin, cfg):
    """OpenAI's ApplyTimestampRules.apply, row by row; ``tokens`` is ``[B, cur]``.

    Returns:
        ``(logits, margins)``: the filtered logits and, per row, the sum rule's
        ``timestamp_logprob - max_text_token_logprob`` (to skip float near-ties).
    """
    logits = np.array(logits, dtype=np.float32)
    ts_begin = cfg.timestamp_begin

    # suppress <|notimestamps|> which is handled by without_timestamps
    if cfg.no_timestamps is not None:
        logits[:, cfg.no_timestamps] = -np.inf

    # timestamps have to appear in pairs, except directly before EOT; mask logits accordingly
    for k in range(tokens.shape[0]):
        sampled_tokens = tokens[k, sample_begin:]
        seq = [t for t in sampled_tokens.tolist()]
        last_was_timestamp = len(seq) >= 1 and seq[-1] >= ts_begin
        penultimate_was_timestamp = len(seq) < 2 or seq[-2] >= ts_begin

        if last_was_timestamp:
            if penultimate_was_timestamp:  # has to be non-timestamp
                logits[k, ts_begin:] = -np.inf
            else:  # cannot be normal text tokens
                logits[k, : cfg.eot] = -np.inf

        timestamps = sampled_tokens[sampled_tokens >= ts_begin]
        if timestamps.size > 0:
            # timestamps shouldn't decrease; forbid timestamp tokens smaller than the last
            # also force each segment to have a nonzero length, to prevent infinite looping
            if last_was_timestamp and not penultimate_was_timestamp:
                timestamp_last = timestamps[-1]
            else:
                timestamp_last = timestamps[-1] + 1
            logits[k, ts_begin:timestamp_last] = -np.inf

    if tokens.shape[1] == sample_begin:
        # suppress generating non-timestamp tokens at the beginning
        logits[:, :ts_begin] = -np.inf

        # apply the `max_initial_timestamp` option
        if cfg.max_initial_timestamp_index is not None:
            last_allowed = ts_begin + cfg.max_initial_timestamp_index
            logits[:, last_allowed + 1 :] = -np.inf

    # if sum of probability over timestamps is above any other token, sample timestamp
    margins = np.zeros(tokens.shape[0])
    for k in range(tokens.shape[0]):
        logprobs = _np_log_softmax(logits[k])
        timestamp_logprob = _np_logsumexp(logprobs[ts_begin:])
        max_text_token_logprob = logprobs[:ts_begin].max()
        with np.errstate(invalid="ignore"):
            margins[k] = timestamp_logprob - max_text_token_logprob
        if timestamp_logprob > max_text_token_logprob:
            logits[k, :ts_begin] = -np.inf
    return logits, margins


# ----------------------------------------------------------------------------- helpers


def _buffer(history, t=16, fill=0):
    """A ``[1, t]`` token buffer holding ``history`` then junk that must be ignored."""
    buf = np.full((1, t), fill, np.int32)
    buf[0, : len(history)] = history
    return jnp.asarray(buf)


def _allowed(out):
    """The ids left sampleable in a ``[1, V]`` result."""
    return set(np.flatnonzero(~np.isneginf(np.asarray(out)[0])).tolist())


def _rule(fn, history, sample_begin, logits=None, cfg=CFG, fill=0):
    logits = jnp.zeros((1, V), jnp.float32) if logits is None else logits
    out = fn(logits, _buffer(history, fill=fill), len(history), sample_begin, cfg)
    return _allowed(out)


ALL = set(range(V))
TEXT = set(range(EOT))
TIMESTAMPS = set(range(TS, V))


# ----------------------------------------------------------------------------- per rule


def test_no_timestamps_token_is_suppressed():
    assert _rule(suppress_no_timestamps, [SOT, 3, 4], 1) == ALL - {NO_TS}
    cfg = TimestampConfig(TS, EOT, None, None)
    assert _rule(suppress_no_timestamps, [SOT, 3], 1, cfg=cfg) == ALL


def test_pairs_after_a_segment_end_only_timestamp_or_eot():
    # "<|0.00|> Hello <|1.00|>": the last token closed a segment.
    assert _rule(timestamps_in_pairs, [SOT, ts(0), 5, ts(1)], 1) == ALL - TEXT


def test_pairs_after_two_timestamps_only_text():
    # "<|0.00|> Hello <|1.00|><|1.00|>": a new segment just opened.
    assert _rule(timestamps_in_pairs, [SOT, ts(0), 5, ts(1), ts(1)], 1) == ALL - TIMESTAMPS
    # The first sampled token being a timestamp counts as a pair ("penultimate" is the prompt).
    assert _rule(timestamps_in_pairs, [SOT, ts(0)], 1) == ALL - TIMESTAMPS


def test_pairs_ignore_the_prompt_and_the_unused_tail():
    # The prompt ends with a timestamp pair, but nothing was sampled yet.
    assert _rule(timestamps_in_pairs, [ts(0), ts(1)], 2) == ALL
    # One text token sampled after a prompt ending in a timestamp: no constraint.
    assert _rule(timestamps_in_pairs, [ts(0), ts(1), 5], 2) == ALL
    # Junk timestamps past `cur` are not history.
    assert _rule(timestamps_in_pairs, [SOT, 5, 6], 1, fill=ts(1)) == ALL


def test_monotonic_after_text_the_end_is_strictly_later():
    # "<|0.40|> Hello": the segment's end must be > <|0.40|>.
    allowed = _rule(timestamps_monotonic, [SOT, ts(0.4), 5], 1)
    assert allowed == ALL - set(range(TS, ts(0.4) + 1))


def test_monotonic_after_an_end_the_next_start_may_equal_it():
    # "<|0.00|> Hello <|1.00|>": the next start may be <|1.00|> itself.
    allowed = _rule(timestamps_monotonic, [SOT, ts(0), 5, ts(1)], 1)
    assert allowed == ALL - set(range(TS, ts(1)))


def test_monotonic_uses_the_latest_timestamp_not_the_largest():
    # A (malformed) history that went backwards: the bound follows the last timestamp.
    allowed = _rule(timestamps_monotonic, [SOT, ts(1.5), 5, ts(0.2), 6], 1)
    assert allowed == ALL - set(range(TS, ts(0.2) + 1))


def test_monotonic_ignores_prompt_timestamps():
    assert _rule(timestamps_monotonic, [ts(1.0), SOT, 5], 2) == ALL
    assert _rule(timestamps_monotonic, [SOT], 1) == ALL


def test_initial_step_only_early_timestamps():
    # max_initial_timestamp_index=5 allows <|0.00|> .. <|0.10|>.
    assert _rule(initial_timestamp, [SOT, 7], 2) == set(range(TS, TS + 6))
    cfg = TimestampConfig(TS, EOT, NO_TS, None)
    assert _rule(initial_timestamp, [SOT, 7], 2, cfg=cfg) == TIMESTAMPS
    # Not the first step: no constraint.
    assert _rule(initial_timestamp, [SOT, 7, 5], 2) == ALL


def test_sum_rule_fires_when_timestamp_mass_beats_every_text_token():
    logits = np.full((1, V), -np.inf, np.float32)
    logits[0, 5] = 0.0  # the best text token
    logits[0, EOT] = -0.5
    logits[0, TS : TS + 10] = -1.0  # logsumexp = -1 + log 10 > 0
    out = timestamp_if_probable(jnp.asarray(logits), _buffer([SOT]), 1, 1, CFG)
    assert _allowed(out) == set(range(TS, TS + 10))
    np.testing.assert_array_equal(np.asarray(out)[0, TS:], logits[0, TS:])


def test_sum_rule_keeps_text_when_one_text_token_dominates():
    logits = np.full((1, V), -np.inf, np.float32)
    logits[0, 5] = 0.0
    logits[0, TS : TS + 2] = -1.0  # logsumexp = -1 + log 2 < 0
    out = timestamp_if_probable(jnp.asarray(logits), _buffer([SOT]), 1, 1, CFG)
    assert _allowed(out) == {5, TS, TS + 1}


def test_sum_rule_exact_tie_keeps_text():
    # OpenAI compares with a strict ">": one timestamp exactly as likely as the best text token.
    logits = np.full((1, V), -np.inf, np.float32)
    logits[0, 5] = 0.25
    logits[0, ts(0.5)] = 0.25
    out = timestamp_if_probable(jnp.asarray(logits), _buffer([SOT]), 1, 1, CFG)
    assert _allowed(out) == {5, ts(0.5)}


def test_sum_rule_with_one_side_all_masked_changes_nothing_and_stays_finite():
    for lo, hi in ((0, TS), (TS, V)):
        logits = np.zeros((1, V), np.float32)
        logits[0, lo:hi] = -np.inf
        out = np.asarray(timestamp_if_probable(jnp.asarray(logits), _buffer([SOT]), 1, 1, CFG))
        np.testing.assert_array_equal(out, logits)


def test_composed_rules_after_a_segment_end():
    # "<|0.00|> Hello <|1.00|>" with EOT favoured: timestamps >= <|1.00|> or EOT; the specials
    # between EOT and the timestamps stay as OpenAI leaves them (they are masked elsewhere).
    logits = np.zeros((1, V), np.float32)
    logits[0, EOT] = 10.0
    out = apply_timestamp_rules(jnp.asarray(logits), _buffer([SOT, ts(0), 5, ts(1)]), 4, 1, CFG)
    assert _allowed(out) == {EOT, SOT} | set(range(ts(1), V))
    # With flat logits the 51 open timestamps outweigh EOT, so the sum rule removes it.
    out = apply_timestamp_rules(jnp.zeros((1, V)), _buffer([SOT, ts(0), 5, ts(1)]), 4, 1, CFG)
    assert _allowed(out) == set(range(ts(1), V))


def test_composed_rules_first_step():
    out = apply_timestamp_rules(jnp.zeros((2, V)), _buffer([SOT, 7], t=8).repeat(2, 0), 2, 2, CFG)
    assert np.isneginf(np.asarray(out)).sum(1).tolist() == [V - 6, V - 6]
    assert _allowed(out[:1]) == set(range(TS, TS + 6))


def test_end_of_text_is_held_until_a_timestamp_reaches_the_row_s_hold():
    hold = lambda history, until, fill=0: _rule(  # noqa: E731
        lambda *a: hold_end_of_text(*a, jnp.asarray([until], jnp.int32)), history, 1, fill=fill)
    closed = [SOT, ts(0), 5, ts(1.0)]  # "<|0.00|> Hello <|1.00|>"
    assert hold(closed, round(1.5 / 0.02)) == ALL - {EOT}  # 1.0 s < 1.5 s: go on
    assert hold(closed, round(1.0 / 0.02)) == ALL  # reached
    assert hold(closed, 0) == ALL  # no hold
    assert hold([SOT, 5], 1) == ALL - {EOT}  # no timestamp sampled yet
    assert hold([SOT, 5], 0) == ALL
    assert hold([ts(1.9), SOT, 5], 10) == ALL - {EOT}  # the prompt's timestamps do not count
    assert hold([SOT, 5], 10, fill=ts(1.9)) == ALL - {EOT}  # nor do those past cur
    # Per row: one held, one free, in one call.
    out = hold_end_of_text(jnp.zeros((2, V)), _buffer(closed).repeat(2, 0), 4, 1, CFG, jnp.asarray([75, 50]))
    assert np.isneginf(np.asarray(out)[:, EOT]).tolist() == [True, False]
    # Composed with OpenAI's rules after a closed segment: only later timestamps are left.
    logits = np.zeros((1, V), np.float32)
    logits[0, EOT] = 10.0
    held = hold_end_of_text(jnp.asarray(logits), _buffer(closed), 4, 1, CFG, jnp.asarray([75]))
    assert _allowed(apply_timestamp_rules(held, _buffer(closed), 4, 1, CFG)) == set(range(ts(1), V))


# ----------------------------------------------------------------------------- parity


def _random_history(rng, length, n_ts):
    """Token histories biased towards Whisper's shapes: pairs, lone timestamps, text, EOT."""
    out, t = [], int(rng.integers(0, 3))
    while len(out) < length:
        r = rng.random()
        if r < 0.25:  # a segment: "<|a|> text... <|b|>" with increasing times
            out.append(TS + min(t, n_ts - 1))
            out.extend(rng.integers(0, EOT, int(rng.integers(0, 4))).tolist())
            t += int(rng.integers(0, 4))
            out.append(TS + min(t, n_ts - 1))
        elif r < 0.4:  # an arbitrary timestamp, possibly going backwards
            out.append(TS + int(rng.integers(0, n_ts)))
        elif r < 0.5:  # EOT or another special
            out.append(int(rng.integers(EOT, TS)))
        else:
            out.extend(rng.integers(0, EOT, int(rng.integers(1, 4))).tolist())
    return out[:length]


def _random_logits(rng, b, v):
    logits = rng.normal(0.0, rng.choice([0.5, 2.0, 5.0]), (b, v)).astype(np.float32)
    # Timestamp mass that beats text about half the time, so the sum rule fires often.
    logits[:, TS:] += rng.choice([-3.0, 0.0, 1.0, 3.0], size=(b, 1))
    # Earlier filters (SuppressTokens, SuppressBlank) may already have masked some ids.
    pre = rng.random((b, v)) < rng.choice([0.0, 0.1, 0.5])
    # EOT and <|0.00|> are never suppressed before this filter, so every row keeps a finite entry
    # (OpenAI would sample from NaNs otherwise).
    pre[:, [EOT, TS]] = False
    logits[pre] = -np.inf
    return logits


def _cases(rng, n_cases, b, t, n_ts):
    tokens = np.zeros((n_cases, b, t), np.int32)
    logits = np.zeros((n_cases, b, TS + n_ts), np.float32)
    curs = np.zeros(n_cases, np.int32)
    begins = np.zeros(n_cases, np.int32)
    for c in range(n_cases):
        begins[c] = rng.integers(0, 6)
        first_step = rng.random() < 0.15
        curs[c] = begins[c] if first_step else rng.integers(begins[c], t + 1)
        for k in range(b):
            tokens[c, k] = _random_history(rng, t, n_ts)
        logits[c] = _random_logits(rng, b, TS + n_ts)
    return tokens, logits, curs, begins


@pytest.mark.parametrize(
    "b, n_ts, max_initial",
    list(itertools.product([1, 3], [4, 40], [None, 0, 3])),
)
def test_matches_openai_on_random_histories(b, n_ts, max_initial):
    rng = np.random.default_rng(1000 * b + 10 * n_ts + (max_initial or 7))
    cfg = TimestampConfig(TS, EOT, NO_TS, max_initial)
    n_cases, t = 400, 20
    tokens, logits, curs, begins = _cases(rng, n_cases, b, t, n_ts)

    batched = jax.jit(jax.vmap(apply_timestamp_rules, in_axes=(0, 0, 0, 0, None)), static_argnums=4)
    got = np.asarray(batched(logits, tokens, curs, begins, cfg))

    fired = near_ties = first_steps = 0
    for c in range(n_cases):
        want, margins = openai_apply(logits[c], tokens[c, :, : curs[c]], int(begins[c]), cfg)
        first_steps += curs[c] == begins[c]
        for k in range(b):
            if abs(margins[k]) < 1e-4:  # float32 vs float64 may round the sum rule either way
                near_ties += 1
                continue
            fired += margins[k] > 0
            np.testing.assert_array_equal(
                np.isneginf(got[c, k]), np.isneginf(want[k]), err_msg=f"case {c} row {k}"
            )
            np.testing.assert_array_equal(got[c, k], want[k], err_msg=f"case {c} row {k}")
    rows = n_cases * b
    assert near_ties < 0.01 * rows
    assert 0.2 * rows < fired < 0.9 * rows, "the sum rule should fire in many, not all, rows"
    assert first_steps > 0.1 * n_cases


def test_random_histories_exercise_every_branch():
    """Guards the parity test: its generator must reach each of OpenAI's branches."""
    rng = np.random.default_rng(0)
    seen = {"pair": 0, "lone": 0, "closing": 0, "open": 0}
    tokens, _, curs, begins = _cases(rng, 400, 3, 20, 40)
    for c in range(400):
        for k in range(3):
            seq = tokens[c, k, begins[c] : curs[c]].tolist()
            last = len(seq) >= 1 and seq[-1] >= TS
            penult = len(seq) < 2 or seq[-2] >= TS
            has_ts = any(x >= TS for x in seq)
            seen["pair"] += last and penult
            seen["lone"] += last and not penult
            seen["closing"] += has_ts and last and not penult
            seen["open"] += has_ts and not last
    assert min(seen.values()) > 50, seen


# ----------------------------------------------------------------------------- in a decode loop


def test_compiles_once_as_cur_and_sample_begin_change():
    traces = []

    @jax.jit
    def step(logits, tokens, cur, sample_begin):
        traces.append(1)
        return apply_timestamp_rules(logits, tokens, cur, sample_begin, CFG)

    tokens = _buffer([SOT, ts(0), 5, ts(1)], t=16).repeat(2, 0)
    logits = jnp.zeros((2, V))
    for cur, begin in [(1, 1), (2, 1), (4, 1), (4, 3), (9, 0)]:
        step(logits, tokens, jnp.int32(cur), jnp.int32(begin)).block_until_ready()
    assert len(traces) == 1


def test_greedy_decode_in_a_fori_loop_matches_a_python_loop():
    """The rules inside a jitted loop with traced ``cur``, against OpenAI's step by step."""
    rng = np.random.default_rng(7)
    b, t, sample_begin = 4, 24, 3
    scripted = rng.normal(0.0, 2.0, (t, b, V)).astype(np.float32)  # logits per position
    scripted[:, :, TS:] += 1.0
    prompt = np.array([[SOT, 1, 2]] * b, np.int32)

    @jax.jit
    def decode(tokens):
        def body(cur, tokens):
            logits = jnp.asarray(scripted)[cur]  # [B, V]
            logits = apply_timestamp_rules(logits, tokens, cur, sample_begin, CFG)
            return tokens.at[:, cur].set(jnp.argmax(logits, axis=-1).astype(jnp.int32))

        return jax.lax.fori_loop(sample_begin, t, body, tokens)

    buf = np.zeros((b, t), np.int32)
    buf[:, :sample_begin] = prompt
    got = np.asarray(decode(jnp.asarray(buf)))

    want = prompt
    for cur in range(sample_begin, t):
        logits, _ = openai_apply(scripted[cur], want, sample_begin, CFG)
        want = np.concatenate([want, logits.argmax(-1)[:, None].astype(np.int32)], axis=1)
    np.testing.assert_array_equal(got, want)
    # The rules did their job: every row starts with an early timestamp and has some structure.
    assert (got[:, sample_begin] >= TS).all() and (got[:, sample_begin] <= TS + 5).all()
