"""Greedy decoding: a scripted-stub loop test, parity with faster-whisper, compile counting."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CLIPS, faster_whisper_model
from whisperjax_cli.decoding import LoopConfig, LoopState, decode_loop, decode_window, encode
from whisperjax_cli.longform import transcribe
from whisperjax_cli.window_decoder import build_prompt, compression_ratio, left_pad

EOT = 9


def _scripted_state(vocab=12, batch=2, sample_len=6, prompt=2):
    tokens = jnp.concatenate([jnp.full((batch, prompt), 1, jnp.int32), jnp.full((batch, sample_len), EOT, jnp.int32)], 1)
    return LoopState(tokens, jnp.int32(prompt), jnp.zeros((batch, vocab)), {"calls": jnp.zeros((), jnp.int32)},
                     jnp.zeros((batch,)), jnp.zeros((batch,), bool), jax.random.PRNGKey(0), jnp.zeros((batch,), bool))


def test_loop_with_a_stub_model_follows_the_script():
    """Row 0 is scripted to say 3, 4, EOT; row 1 says 5 forever. Checks tokens, logprobs, stop."""
    script = {0: [3, 4, EOT], 1: [5, 5, 5, 5, 5, 5]}

    def step(token, cache, index):  # logits for slot index + 1, favouring the scripted token
        k = index + 1 - 2
        logits = jnp.full((2, 12), -5.0)
        for row, seq in script.items():
            want = jnp.asarray(seq + [EOT] * 8)[jnp.clip(k, 0, 8)]
            logits = logits.at[row, want].set(2.0)
        return logits, None if cache is None else {"calls": cache["calls"] + 1}

    state = _scripted_state()
    first, _ = step(None, None, jnp.int32(1))
    state = state.replace(logits=first)
    config = LoopConfig(sample_len=6, eot=EOT, no_speech=None, timestamps=None)
    no_mask = jnp.zeros((12,), bool)
    out = jax.jit(lambda s: decode_loop(step, s, jnp.int32(2), no_mask, no_mask, jnp.float32(0), config))(state)
    np.testing.assert_array_equal(out.tokens[0, 2:], [3, 4, EOT, EOT, EOT, EOT])
    np.testing.assert_array_equal(out.tokens[1, 2:], [5, 5, 5, 5, 5, 5])
    step_logprob = float(jax.nn.log_softmax(first[0])[3])
    np.testing.assert_allclose(out.sum_logprobs[0], 3 * step_logprob, rtol=1e-4)  # 3, 4 and EOT each
    np.testing.assert_allclose(out.sum_logprobs[1], 6 * step_logprob, rtol=1e-4)
    assert int(out.cur) == 8 and bool(out.done[0]) and not bool(out.done[1])


def _periodic_within(seq, span, max_period):
    """Plain reimplementation of repeats_itself for one row's sampled tokens."""
    if len(seq) < span + max_period:
        return False
    tail = seq[-span:]
    return any(tail == seq[len(seq) - span - p : len(seq) - p] for p in range(1, max_period + 1))


def test_loop_detection_agrees_with_a_plain_reimplementation():
    from whisperjax_cli.decoding import repeats_itself

    rng = np.random.default_rng(0)
    rows, width, begin = 400, 90, 5
    tokens = rng.integers(0, 4, (rows, width))
    for r in range(0, rows, 2):  # half the rows: a looping tail of random period and start
        period, start = rng.integers(1, 20), rng.integers(begin, width - 10)
        unit = rng.integers(0, 50, period)
        tokens[r, start:] = np.resize(unit, width - start)
    for last in (40, 67, 68, 75, 89):
        got = np.asarray(repeats_itself(jnp.asarray(tokens, jnp.int32), jnp.int32(last), jnp.int32(begin), 48, 16))
        want = [_periodic_within(list(tokens[r, begin : last + 1]), 48, 16) for r in range(rows)]
        np.testing.assert_array_equal(got, want)
        assert last < 68 or 0 < sum(want) < rows  # both outcomes are exercised once rows are long enough


def test_a_loop_of_timestamped_segments_is_a_loop():
    """" S." between rising timestamp pairs never repeats token for token; with timestamp_begin
    every timestamp counts as one token, so it loops with period 3 (agreeing with the plain
    reimplementation over timestamps mapped to one id), and text alone is unaffected."""
    from whisperjax_cli.decoding import repeats_itself

    ts, begin = 100, 2
    sampled = []
    for i in range(30):  # " S." then an end and a start timestamp, times rising
        sampled += [7, ts + 2 * i + 1, ts + 2 * i + 2]
    rng = np.random.default_rng(5)
    text = [int(t) for t in rng.integers(0, 50, 90)]  # no short period
    tokens = jnp.asarray([[1, 1] + sampled, [1, 1] + text], jnp.int32)
    plain = lambda seq: _periodic_within([min(t, ts) for t in seq], 48, 16)  # noqa: E731
    for last in (60, 66, 67, 91):
        with_ts = np.asarray(repeats_itself(tokens, jnp.int32(last), jnp.int32(begin), 48, 16, timestamp_begin=ts))
        without = np.asarray(repeats_itself(tokens, jnp.int32(last), jnp.int32(begin), 48, 16))
        want = [plain(list(np.asarray(tokens[r, begin : last + 1]))) for r in range(2)]
        np.testing.assert_array_equal(with_ts, want)
        assert not without.any()
        assert with_ts[0] == (last - begin + 1 >= 64) and not with_ts[1]


def test_a_looping_row_stops_early_and_is_marked():
    """Row 0 says 3, 4, 5 forever; row 1 a sequence without a short period. With loop_span the
    loop ends row 0 after 64 sampled tokens (48 repeating the 48 before, shifted by 3)."""
    rng = np.random.default_rng(1)
    plain = [int(t) for t in rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 10], 102)]
    assert not any(_periodic_within(plain[: n + 1], 48, 16) for n in range(102))
    script = jnp.asarray([[3, 4, 5] * 34, plain[:102]])

    def step(token, cache, index):
        k = jnp.clip(index + 1 - 2, 0, 99)
        return jnp.full((2, 12), -5.0).at[jnp.arange(2), script[:, k]].set(2.0), cache

    for span, stop_row0 in ((48, 64), (0, None)):
        config = LoopConfig(sample_len=100, eot=EOT, no_speech=None, timestamps=None, loop_span=span)
        state = _scripted_state(sample_len=100)
        state = state.replace(logits=step(None, None, jnp.int32(1))[0])
        no_mask = jnp.zeros((12,), bool)
        out = decode_loop(step, state, jnp.int32(2), no_mask, no_mask, jnp.float32(0), config)
        np.testing.assert_array_equal(out.tokens[1, 2:], plain[:100])
        assert not bool(out.looped[1])
        if stop_row0 is None:
            np.testing.assert_array_equal(out.tokens[0, 2:], script[0, :100])
            assert not bool(out.looped[0])
        else:
            np.testing.assert_array_equal(out.tokens[0, 2 : 2 + stop_row0], script[0, :stop_row0])
            assert (np.asarray(out.tokens[0, 2 + stop_row0 :]) == EOT).all() and bool(out.looped[0])


def test_suppress_masks_apply_and_blank_only_at_the_first_step():
    def step(token, cache, index):
        return jnp.tile(jnp.arange(12.0)[None], (2, 1)), cache  # always prefers the largest id

    config = LoopConfig(sample_len=4, eot=EOT, no_speech=None, timestamps=None)
    suppress = jnp.zeros((12,), bool).at[11].set(True)
    begin = jnp.zeros((12,), bool).at[10].set(True)
    state = _scripted_state(sample_len=4)
    state = state.replace(logits=step(None, None, 0)[0])
    out = decode_loop(step, state, jnp.int32(2), suppress, begin, jnp.float32(0), config)
    # First step: 11 is suppressed and 10 is blank-suppressed, so 9 (EOT) wins and the row ends.
    np.testing.assert_array_equal(out.tokens[:, 2:], [[EOT] * 4] * 2)
    # From the second step on only 11 is masked: without the EOT row end, 10 would follow.
    state = state.replace(cur=jnp.int32(3))
    out = decode_loop(step, state, jnp.int32(2), suppress, begin, jnp.float32(0), config)
    np.testing.assert_array_equal(out.tokens[:, 3], [10, 10])


def test_prompt_building_and_left_padding():
    class Tok:
        sot_prev, no_timestamps = 100, 101

    tokens, tail = build_prompt(Tok, (1, 2, 3), list(range(300)), without_timestamps=True, n_text_ctx=448)
    assert tokens[0] == 100 and tokens[1:224] == list(range(77, 300)) and tokens[-4:] == [1, 2, 3, 101]
    assert tail == 4
    padded, pad = left_pad([[5, 6], [7]], 4, 0)
    np.testing.assert_array_equal(padded, [[0, 0, 5, 6], [0, 0, 0, 7]])
    np.testing.assert_array_equal(pad, [2, 3])
    assert compression_ratio("ab " * 100) > 5 > compression_ratio("the quick brown fox") > 0


@pytest.mark.parametrize("model_name", ["tiny_en", "base"])
def test_greedy_tokens_identical_to_faster_whisper(model_name, request, clip_audio):
    model = request.getfixturevalue(model_name)
    fw = faster_whisper_model(model)
    mismatches = []
    for clip in CLIPS:
        audio = clip_audio[clip.name]
        # OpenAI's rule alone: tiny.en loops on the Russian clip, where by default our row would
        # stop while CTranslate2 runs on to the length limit.
        ours = transcribe(model, audio, temperature=0.0, without_timestamps=True, stop_loops=False)
        segs, info = fw.transcribe(audio, beam_size=1, without_timestamps=True, temperature=0.0,
                                   condition_on_previous_text=False)
        theirs = [t for s in segs for t in s.tokens]
        if [t for s in ours.segments for t in s.tokens] != theirs:
            mismatches.append(clip.name)
        if model.is_multilingual:
            assert ours.language == info.language, clip.name
            assert abs(ours.language_probability - info.language_probability) <= 0.01, clip.name
    assert mismatches == []


def test_russian_is_detected_and_transcribed_in_cyrillic(base, clip_audio):
    result = transcribe(base, clip_audio["russian-8k.wav"], temperature=0.0)
    assert result.language == "ru" and result.language_probability > 0.95
    assert "стали" in result.text and "Аппарат" in result.text


def test_repeated_calls_do_not_recompile(tiny_en, clip_audio):
    transcribe(tiny_en, clip_audio["cards-001.flac"], temperature=0.0, without_timestamps=True)
    sizes = (decode_window._cache_size(), encode._cache_size())
    for name in ("cards-002.flac", "goforward.flac", "something.wav"):
        transcribe(tiny_en, clip_audio[name], temperature=0.0, without_timestamps=True)
    assert (decode_window._cache_size(), encode._cache_size()) == sizes


def test_silence_gives_no_text(tiny_en):
    rng = np.random.default_rng(0)
    for audio in (np.zeros(30 * 16000, np.float32), (rng.standard_normal(30 * 16000) * 1e-3).astype(np.float32)):
        for mode in ("sequential", "batched"):
            result = transcribe(tiny_en, audio, mode=mode)
            assert result.text.strip() == "" and result.segments == [], mode


def test_inverse_cdf_sampling_follows_the_softmax_and_never_draws_masked_ids():
    from whisperjax_cli.decoding import sample_categorical

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.2, 0.0]] * 4000))  # id 3 is masked (-inf)
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    draws = np.concatenate([np.asarray(sample_categorical(k, logits)) for k in keys])
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq[:3], [0.5, 0.3, 0.2], atol=0.01)
    assert freq[3] == 0


def test_two_level_sampling_follows_the_softmax_across_blocks():
    """700 ids: two full blocks of SAMPLE_BLOCK and a partial one; mass at both edges of each
    block, a spread-out tail, and masked ids between them."""
    from whisperjax_cli.decoding import SAMPLE_BLOCK, sample_categorical

    assert SAMPLE_BLOCK == 256
    probs = np.zeros(700)
    probs[[0, 255, 256, 511, 512, 699]] = [0.2, 0.1, 0.15, 0.05, 0.1, 0.1]
    probs[300:500] = 0.3 / 200
    logits = jnp.log(jnp.asarray(np.tile(probs, (2000, 1)), jnp.float32))
    keys = jax.random.split(jax.random.PRNGKey(1), 10)
    draws = np.concatenate([np.asarray(sample_categorical(k, logits)) for k in keys])
    freq = np.bincount(draws, minlength=700) / len(draws)
    assert freq[probs == 0].sum() == 0
    np.testing.assert_allclose(freq[[0, 255, 256, 511, 512, 699]], [0.2, 0.1, 0.15, 0.05, 0.1, 0.1], atol=0.01)
    np.testing.assert_allclose(freq[300:500].sum(), 0.3, atol=0.01)


def test_first_argmax_is_argmax():
    from whisperjax_cli.decoding import first_argmax

    rng = np.random.default_rng(3)
    x = rng.integers(-3, 3, (64, 999)).astype(np.float32)  # many ties: the first maximum wins
    x[5] = -np.inf
    x[6, 100:] = -np.inf
    x[7, -1] = 9.0
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), np.argmax(x, axis=-1))


def test_batched_encode_runs_in_chunks_and_matches_single_windows(tiny_en, clip_audio):
    """A batch of 4 (two chunks of ENCODE_CHUNK) and an odd batch of 3 (single windows) give each
    window's own encoding."""
    from whisperjax_cli.features import N_FRAMES, log_mel_spectrogram, pad_or_trim
    from whisperjax_cli.model import Whisper

    names = ("cards-001.flac", "goforward.flac", "something.wav", "cards-002.flac")
    mels = np.stack([pad_or_trim(log_mel_spectrogram(clip_audio[n]), N_FRAMES) for n in names])
    single = [np.asarray(tiny_en.module.apply({"params": tiny_en.params}, m[None], method=Whisper.encode))[0]
              for m in mels]
    for batch in (mels, mels[:3]):
        out = np.asarray(encode(tiny_en.module, tiny_en.params, batch))
        assert out.shape == (len(batch), 1500, 384)
        for got, want in zip(out, single):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # rows=1 of a batch of 4: the chunk holding row 0 is encoded, the other chunk is left zero
    out = np.asarray(encode(tiny_en.module, tiny_en.params, mels, np.int32(1)))
    for got, want in zip(out[:2], single):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert not out[2:].any()


def test_rows_moved_to_smaller_batches_decode_as_they_would_alone(tiny_en, clip_audio):
    """Four clips of different lengths in one batch: the loop shrinks 4 -> 2 -> 1 rows as they
    end (decode_phases); each clip's tokens and log probability equal its own batch-of-one run."""
    from whisperjax_cli.decoding import phase_sizes
    from whisperjax_cli.longform import transcribe_files

    assert phase_sizes(8) == (8, 4, 2, 1) and phase_sizes(5) == (5, 2, 1) and phase_sizes(1) == (1,)
    names = ("cards-001.flac", "goforward.flac", "something.wav", "cards-002.flac")
    kwargs = dict(temperature=0.0, without_timestamps=True, batch_size=4)
    together = {e.index: e.transcript for e in transcribe_files(tiny_en, [clip_audio[n] for n in names], **kwargs)
                if e.transcript is not None}
    lengths = set()
    for i, name in enumerate(names):
        alone = transcribe(tiny_en, clip_audio[name], **kwargs)
        got, want = together[i].segments[0], alone.segments[0]
        assert got.tokens == want.tokens, name
        assert abs(got.avg_logprob - want.avg_logprob) < 1e-4, name
        lengths.add(len(want.tokens))
    assert len(lengths) >= 3  # rows really end at different steps


def test_best_of_rows_keep_their_own_audio_when_the_batch_shrinks(tiny_en, clip_audio):
    """best_of=3 samples of two windows (6 rows, audio shared in groups of 3) at a temperature so
    low that sampling is argmax: every sample must equal its window's greedy tokens, through
    the phases 6 -> 3 -> 1 where each row's audio keys/values are gathered from its group."""
    import jax

    from whisperjax_cli.options import TranscribeOptions
    from whisperjax_cli.window_decoder import LazyKey, WindowDecoder
    from whisperjax_cli.features import N_FRAMES, log_mel_spectrogram, pad_or_trim

    decoder = WindowDecoder(tiny_en, TranscribeOptions(best_of=3, without_timestamps=True))
    prompt = list(tiny_en.tokenizer.sot_sequence) + [tiny_en.tokenizer.no_timestamps]
    pair = ("cards-001.flac", "forever-44k-stereo.flac")  # 4 and 9 tokens
    for names in (pair, pair[::-1]):  # either window may end first
        mels = np.stack([pad_or_trim(log_mel_spectrogram(clip_audio[n]), N_FRAMES) for n in names])
        audio = decoder.encode(mels)
        greedy, _ = decoder._decode_rows(audio, [0, 1], [prompt, prompt], len(prompt), 0.0, None)
        decoder._best = lambda candidates: candidates  # keep all three samples, not the best
        sampled, _ = decoder._decode_rows(audio, [0, 1], [prompt, prompt], len(prompt), 1e-4,
                                          LazyKey(jax.random.PRNGKey(1)))
        del decoder._best
        assert len(greedy[0].tokens) != len(greedy[1].tokens)
        for g, samples in zip(greedy, sampled):
            assert len(samples) == 3
            for s in samples:
                assert s.tokens == g.tokens and s.temperature == 1e-4, names


def test_when_every_temperature_fails_the_likeliest_not_repetitive_result_is_kept(tiny_en, monkeypatch):
    """faster-whisper's rule: the best average log probability among results under the
    compression threshold (else among all), reported at the last temperature."""
    from whisperjax_cli.options import TranscribeOptions
    from whisperjax_cli.window_decoder import DecodingResult, WindowDecoder

    decoder = WindowDecoder(tiny_en, TranscribeOptions(temperature=(0.0, 0.5, 1.0)))
    looped: set[float] = set()
    scripted = {  # temperature -> (avg logprob, compression ratio): every one fails
        0.0: (-0.5, 3.0),  # the likeliest, but too repetitive
        0.5: (-1.2, 1.5),  # the likeliest of the rest: kept
        1.0: (-1.8, 1.2),
    }

    def rows(audio, todo, prompts, tail, temperature, key, holds=None, keep_cross=False):
        lp, cr = scripted[temperature]
        return [DecodingResult([1, 2], f"t{temperature}", 3 * lp, lp, 0.1, temperature, cr, temperature in looped)
                for _ in todo], None

    monkeypatch.setattr(decoder, "_decode_rows", rows)
    (kept,) = decoder.decode(None, 1, [[1]], 1, jax.random.PRNGKey(0))
    assert kept.text == "t0.5" and kept.temperature == 1.0
    scripted.update({0.5: (-1.2, 2.9), 1.0: (-1.8, 2.6)})  # all too repetitive: the likeliest of all
    (kept,) = decoder.decode(None, 1, [[1]], 1, jax.random.PRNGKey(0))
    assert kept.text == "t0.0" and kept.temperature == 1.0
    scripted[0.5] = (-0.2, 1.5)  # one passes: no fallback after it
    (kept,) = decoder.decode(None, 1, [[1]], 1, jax.random.PRNGKey(0))
    assert kept.text == "t0.5" and kept.temperature == 0.5
    looped.add(0.5)  # stopped while looping: too repetitive whatever its ratio, and not kept while
    scripted[1.0] = (-1.8, 1.2)  # a result under the compression threshold exists
    (kept,) = decoder.decode(None, 1, [[1]], 1, jax.random.PRNGKey(0))
    assert kept.text == "t1.0" and kept.temperature == 1.0


def test_compression_ratio_is_of_the_stripped_text_as_openai_and_faster_whisper(tiny_en):
    """Both measure ``decode(tokens).strip()``; the leading space moves the ratio near 2.4."""
    from whisperjax_cli.options import TranscribeOptions
    from whisperjax_cli.window_decoder import WindowDecoder

    decoder = WindowDecoder(tiny_en, TranscribeOptions())
    ids = tiny_en.tokenizer.encode(" the quick brown fox") + [tiny_en.tokenizer.eot]
    r = decoder._result(np.asarray(ids), -1.0, 0.1, 0.0)
    assert r.text == " the quick brown fox"
    assert r.compression_ratio == compression_ratio("the quick brown fox") != compression_ratio(r.text)


def test_a_beam_result_that_ends_in_a_loop_is_looped_though_it_finished(tiny_en, monkeypatch):
    """Beam search stops an audio once its best running beam loops; a sequence that finished
    before then can end in that loop (" HTTP, W-W-W-...-W" then end-of-text on the benchmark's
    first window) and then won the ranking unflagged, under the compression threshold, kept
    where greedy decoding falls back. Now it is looped (so fallen back from) as greedy's rows
    are, and a beam result without a loop at its end is left as it was."""
    from whisperjax_cli import window_decoder
    from whisperjax_cli.decoding import DecodeOutput
    from whisperjax_cli.options import TranscribeOptions

    tok = tiny_en.tokenizer
    # the last 48 tokens repeat every 2; compression ratio 1.6
    loop = tok.encode(" Licensed under the Apache License, Version 2.0, January 2004, as published at HTTP, W")
    loop += tok.encode("-W") * 25
    plain = tok.encode(" the quick brown fox jumps over the lazy dog, and the dog, the fox and the lazy cat")
    chosen = {}

    def program(module, params, inputs, config):
        rows = np.full((1, 224), tok.eot, np.int32)
        rows[0, : len(chosen["tokens"])] = chosen["tokens"]
        return DecodeOutput(rows, np.float32([-5.0]), np.float32([0.1]), np.zeros(1, bool), None)

    monkeypatch.setattr(window_decoder, "beam_search_window", program)
    monkeypatch.setattr(window_decoder, "decode_window", program)
    audio = jnp.zeros((1, 1500, tiny_en.dims.n_audio_state), jnp.float32)
    results = {}
    for beam in (5, None):
        decoder = window_decoder.WindowDecoder(tiny_en, TranscribeOptions(beam_size=beam))
        for name, tokens in (("loop", loop), ("plain", plain)):
            chosen["tokens"] = tokens
            (r,), _ = decoder._decode_rows(audio, [0], [[1]], 1, 0.0, window_decoder.LazyKey(jax.random.PRNGKey(0)))
            assert r.tokens == tokens and r.compression_ratio < 2.4
            results[beam, name] = r.looped
    # greedy rows are judged inside the program (its looped flag, False here)
    assert results == {(5, "loop"): True, (5, "plain"): False, (None, "loop"): False, (None, "plain"): False}
    decoder = window_decoder.WindowDecoder(tiny_en, TranscribeOptions(beam_size=5, stop_loops=False))
    chosen["tokens"] = loop  # with loops left to run, OpenAI's rules alone
    assert not decoder._decode_rows(audio, [0], [[1]], 1, 0.0, window_decoder.LazyKey(jax.random.PRNGKey(0)))[0][0].looped
