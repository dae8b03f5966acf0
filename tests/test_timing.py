"""Word timestamps: OpenAI's pieces on hand-computed numbers, the refinement and the loop's
decisions on made-up words, and parity with faster-whisper's word timestamps on real speech
(its own decoded tokens fed to our alignment, so both align the same text)."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from whisperjax_cli import alignment, timing, word_decisions
from whisperjax_cli.errors import UsageError
from whisperjax_cli.results import Segment, Word
from whisperjax_cli.timing import WindowWords, WordOptions

DATA = Path(__file__).parent / "data"
PARITY_CLIPS = ("cards-002.flac", "cards-005.flac", "goforward.flac", "numbers.flac", "something.wav", "forever.ogg",
                "russian-8k.wav")  # russian: multilingual models only


def _segment(start, end, tokens=(), words=None, text="x") -> Segment:
    return Segment(id=0, seek=0, start=start, end=end, text=text, tokens=list(tokens), temperature=0.0,
                   avg_logprob=-0.2, compression_ratio=1.2, no_speech_prob=0.01, words=words)


# --- DTW and median filter ---------------------------------------------------------------------


def _dtw_entries(cost) -> list[int]:
    cost = np.asarray(cost, np.float32)
    trace = np.asarray(jax.jit(alignment.dtw_trace)(jnp.asarray(cost)[None]))
    return alignment.backtrace(trace, 0, *cost.shape).tolist()


def test_dtw_follows_the_cheapest_path():
    # Accumulated costs by hand (OpenAI's recurrence): the path is (0,0) (1,1) (1,2) (2,3), so rows
    # are entered at positions 0, 1 and 3.
    assert _dtw_entries([[0, 1, 1, 1], [1, 0, 0, 1], [1, 1, 1, 0]]) == [0, 1, 3]


def test_dtw_breaks_ties_to_the_left_as_openai():
    # All costs equal: at (2, 2) the three moves tie and OpenAI's rule takes the left one, so the
    # path is (0,0) (1,0) (1,1) and row 1 is entered at position 0 (a diagonal-first rule: 1).
    assert _dtw_entries([[0, 0], [0, 0]]) == [0, 0]


def test_dtw_of_padded_rows_and_columns_ignores_the_padding():
    cost = np.random.default_rng(0).random((6, 9)).astype(np.float32)
    padded = np.full((8, 12), -5.0, np.float32)  # padding that would attract the path
    padded[:6, :9] = cost
    trace = np.asarray(jax.jit(alignment.dtw_trace)(jnp.asarray(padded)[None]))
    assert alignment.backtrace(trace, 0, 6, 9).tolist() == _dtw_entries(cost)


def _median(x, frames, width):
    x = jnp.asarray(np.asarray(x, np.float32)[None])
    return np.asarray(alignment.median_filter(x, jnp.asarray([frames], jnp.int32), width))[0]


def test_median_filter_reflects_at_the_last_valid_frame():
    x = [1, 5, 2, 8, 3, 9, 4, 7]
    # reflect padding without repeating the edge: [5, 1 5 2 8 3 9 4 7, 4]
    assert _median(x, 8, 3).tolist() == [5, 2, 5, 3, 8, 4, 7, 4]
    # only 6 valid frames: the last one reflects at frame 5 (3, 9, 3)
    assert _median(x, 6, 3)[:6].tolist() == [5, 2, 5, 3, 8, 3]
    # too few frames to reflect: unchanged, as OpenAI
    assert _median(x, 1, 3)[:1].tolist() == [1]


def test_median_filter_width_7_equals_scipy_mirror():
    from scipy.ndimage import median_filter

    x = np.random.default_rng(1).normal(size=(3, 40)).astype(np.float32)
    got = np.asarray(alignment.median_filter(jnp.asarray(x), jnp.asarray([40, 40, 40], jnp.int32), 7))
    np.testing.assert_array_equal(got, median_filter(x, size=(1, 7), mode="mirror"))


# --- OpenAI's word rules -----------------------------------------------------------------------


def _timings(words):
    return [timing.WordTiming(w, [i], float(i), float(i + 1), 0.5) for i, w in enumerate(words)]


def test_merge_punctuations():
    alignment = _timings([' "', "Hello", ",", " world", ".", '"', " (", "yes", ")"])
    timing.merge_punctuations(alignment, timing.PREPEND_PUNCTUATIONS, timing.APPEND_PUNCTUATIONS)
    assert [(a.word, a.tokens) for a in alignment if a.word] == [
        (' "Hello,', [0, 1, 2]), (' world."', [3, 4, 5]), (" (yes)", [6, 7, 8])]
    assert sum(len(a.tokens) for a in alignment) == 9  # emptied entries keep no tokens


def test_typical_durations_and_sentence_edges():
    alignment = _timings([" a", " b", ".", " c"])
    alignment[2].end = 5.0  # a 3 s full stop
    alignment[3].start, alignment[3].end = 5.0, 9.0  # a 4 s word after it
    median, longest = timing.typical_durations(alignment)
    assert (median, longest) == (0.7, 1.4)  # the median (1 s) is capped at 0.7 s
    timing.clip_sentence_edges(alignment, longest)
    assert (alignment[2].start, alignment[2].end) == (2.0, 3.4)
    assert (alignment[3].start, alignment[3].end) == (7.6, 9.0)


def test_word_options_validation():
    assert WordOptions().refine and WordOptions().median_filter_width == 7
    for bad in (dict(median_filter_width=6), dict(refine_radius=-0.1), dict(quiet_db=0),
                dict(speech_threshold=1.5), dict(prepend_punctuations=None), dict(min_pause="x")):
        with pytest.raises(UsageError):
            WordOptions(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        WordOptions().refine = False


# --- refinement ----------------------------------------------------------------------------------


def _words(*spans):
    return [Word(start, end, f" w{i}", 0.9) for i, (start, end) in enumerate(spans)]


def test_refine_moves_edges_onto_pauses():
    words = _words((0.0, 1.0), (1.0, 2.0))
    timing.refine_words(words, np.array([[0.0, 0.3], [0.8, 1.1], [1.9, 2.5]]), 0.3)
    assert [(w.start, w.end) for w in words] == [(0.3, 0.8), (1.1, 1.9)]


def test_refine_keeps_edges_without_a_pause_nearby():
    words = _words((1.0, 2.0), (2.0, 3.0))
    timing.refine_words(words, np.array([[5.0, 6.0]]), 0.3)
    assert [(w.start, w.end) for w in words] == [(1.0, 2.0), (2.0, 3.0)]


def test_refine_chooses_all_edges_together():
    # Real case (tiny.en, synthetic speech): the edge between " at" and " the" is 0.22 s after the
    # pause before " the" and 0.05 s before the pause after it; taking the nearest would leave
    # " the" on the next word's sound. Together, each word gets its own stretch of sound.
    words = _words((4.38, 5.08), (5.08, 5.86), (5.86, 6.26))
    found = np.array([[4.02, 4.41], [4.71, 4.86], [5.13, 5.73], [6.09, 6.19]])
    timing.refine_words(words, found, 0.3)
    assert [(w.start, w.end) for w in words] == [(4.41, 4.71), (4.86, 5.13), (5.73, 6.09)]


def test_refine_starts_a_first_word_at_the_last_pause_before_it():
    # At the window's start, the path's start says nothing: the quiet before the word is cut by a
    # noise at 0.09-0.23 s (goforward.flac), and the word starts after the second piece.
    words = _words((0.0, 0.8), (0.8, 1.1))
    found = np.array([[0.0, 0.09], [0.23, 0.5], [1.14, 1.26]])
    timing.refine_words(words, found, 0.3, window_start=0.0)
    assert [(w.start, w.end) for w in words] == [(0.5, 0.8), (0.8, 1.14)]
    words = _words((0.0, 0.8), (0.8, 1.1))
    timing.refine_words(words, found, 0.3)  # elsewhere: the nearest pause
    assert words[0].start == 0.09


def test_pauses_of_tone_bursts_and_of_speech_probabilities():
    rate = 16000
    rng = np.random.default_rng(0)
    audio = rng.normal(0, 1e-4, 3 * rate).astype(np.float32)
    for start, stop in ((0.5, 1.2), (1.25, 1.6), (2.0, 2.5)):  # 50 ms and 400 ms gaps
        t = np.arange(int(start * rate), int(stop * rate))
        audio[t] += 0.3 * np.sin(2 * np.pi * 220 * t / rate)
    found = timing.pauses(audio, None, WordOptions())
    np.testing.assert_allclose(found, [[0.0, 0.5], [1.2, 1.25], [1.6, 2.0], [2.5, 3.0]], atol=0.011)
    speech = np.zeros(300)
    speech[50:120] = 0.9
    speech[121:160] = 0.9  # a 10 ms dip is no pause
    assert timing.pauses(None, speech, WordOptions()).tolist() == [[0.0, 0.5], [1.6, 3.0]]


# --- the loop's decisions ------------------------------------------------------------------------


def test_word_anomaly_scores():
    assert word_decisions.word_anomaly_score(Word(0.0, 0.5, " fine", 0.9)) == 0.0
    assert word_decisions.word_anomaly_score(Word(0.0, 0.5, " unlikely", 0.1)) == 1.0
    assert word_decisions.word_anomaly_score(Word(0.0, 0.033, " short", 0.9)) == pytest.approx(1.5)
    assert word_decisions.word_anomaly_score(Word(0.0, 3.5, " long", 0.9)) == pytest.approx(1.5)
    good = _segment(0, 2, words=_words((0.0, 0.5), (0.5, 1.0)))
    bad = _segment(0, 2, words=[Word(0.0, 0.5, " a", 0.1), Word(0.5, 0.52, " b", 0.9), Word(0.6, 0.7, ".", 0.1)])
    assert not word_decisions.is_segment_anomaly(good) and word_decisions.is_segment_anomaly(bad)
    assert not word_decisions.is_segment_anomaly(None) and not word_decisions.is_segment_anomaly(_segment(0, 1, words=[]))


def _hallucinated(start, end):
    return _segment(start, end, words=[Word(start, start + 0.05, " Thank", 0.05), Word(end - 0.05, end, " you", 0.1)])


def test_word_seek_moves_to_the_last_word():
    segments = [_segment(30.0, 34.0, words=_words((30.5, 32.0), (32.0, 33.4)))]
    common = dict(seek=3400, previous_seek=3000, segment_size=3000, content_frames=9000, last_speech_timestamp=29.0)
    assert word_decisions.word_seek(segments, single_timestamp_ending=False, **common) == word_decisions.WordSeek(3340, 1)
    assert word_decisions.word_seek(segments, single_timestamp_ending=True, **common) == word_decisions.WordSeek(3400, 1)
    # with the threshold, only when more than it is left of the window
    assert word_decisions.word_seek(segments, single_timestamp_ending=False, hallucination_silence_threshold=2.0,
                            **common).seek == 3340
    assert word_decisions.word_seek(segments, single_timestamp_ending=False, hallucination_silence_threshold=30.0,
                            **common).seek == 6000


def test_word_seek_skips_silence_before_a_hallucination():
    common = dict(seek=6000, previous_seek=3000, segment_size=3000, content_frames=9000, last_speech_timestamp=29.0,
                  single_timestamp_ending=True, hallucination_silence_threshold=2.0)
    first = [_hallucinated(35.0, 36.0), _segment(36.0, 40.0, words=_words((36.0, 38.0), (38.0, 40.0)))]
    assert word_decisions.word_seek(first, **common) == word_decisions.WordSeek(3500, 0, again=True)
    # in the middle, with silence on both sides: dropped with what follows, the stream moves to it
    middle = [_segment(30.0, 33.0, words=_words((30.0, 31.0), (31.0, 33.0))), _hallucinated(45.0, 46.0),
              _segment(50.0, 52.0, words=_words((50.0, 51.0), (51.0, 52.0)))]
    assert word_decisions.word_seek(middle, **common) == word_decisions.WordSeek(4500, 1)
    # not bracketed by silence: kept
    middle[1] = _hallucinated(33.5, 34.0)
    assert word_decisions.word_seek(middle, **common) == word_decisions.WordSeek(6000, 3)
    assert word_decisions.last_word_end(middle[:1]) == 33.0 and word_decisions.last_word_end([]) is None


# --- the alignment pass on real weights ----------------------------------------------------------


def _load(name, dtype="float32"):
    try:
        from whisperjax_cli.loading import load_model
    except ImportError:  # before models.py became loading.py
        from whisperjax_cli.models import load_model
    return load_model(name, dtype=dtype)


@pytest.fixture(scope="module", params=["tiny.en", "base"])
def model(request):
    return _load(request.param)


@pytest.fixture(scope="module")
def decoded(model):
    """faster-whisper's word timestamps on the same weights (greedy, temperature 0), as the inputs
    and outputs of each of its ``add_word_timestamps`` calls: ``(clip, language, segments before,
    segments after, num_frames, last_speech_timestamp)``, with each clip's audio. Recorded at the
    call, so segments it later drops (zero length) are there and times are the decoded ones."""
    from faster_whisper import WhisperModel

    from whisperjax_cli.audio import load_audio

    fw = WhisperModel(str(model.path), device="cpu", compute_type="float32", cpu_threads=os.cpu_count() or 2)
    calls, audios, original, current = [], {}, fw.add_word_timestamps, []

    def recording(segments, tokenizer, *args, last_speech_timestamp):
        before = copy.deepcopy(segments[0])
        out = original(segments, tokenizer, *args, last_speech_timestamp=last_speech_timestamp)
        calls.append((current[-1], tokenizer.language_code, before, copy.deepcopy(segments[0]), args[1],
                      last_speech_timestamp))
        return out

    fw.add_word_timestamps = recording
    clips = PARITY_CLIPS if model.is_multilingual else [c for c in PARITY_CLIPS if not c.startswith("russian")]
    for clip in clips:
        current.append(clip)
        audios[clip] = load_audio(DATA / clip)
        list(fw.transcribe(audios[clip], word_timestamps=True, beam_size=1, temperature=0.0,
                           condition_on_previous_text=False)[0])
    return calls, audios


@pytest.fixture(scope="module")
def windows(model, decoded):
    """Every window faster-whisper timed, as a :class:`WindowWords` (its tokens and decoded segment
    times) with its expected words, the windows' encoder output (one row each) and their mels."""
    from whisperjax_cli.features import N_SAMPLES, LogMelWindows, model_window
    from whisperjax_cli.model import Whisper

    calls, audios = decoded
    tok = model.tokenizer
    mels, built, logmels = [], [], {}
    for clip, language, before, after, num_frames, last_speech in calls:
        mel = logmels.setdefault(clip, LogMelWindows(audios[clip], model.n_mels, padding=N_SAMPLES))
        seek = before[0]["seek"]
        segments = [_segment(s["start"], s["end"], s["tokens"]) for s in before]
        sot = tuple(tok.sot_sequence_for(language, "transcribe")) if tok.multilingual else tuple(tok.sot_sequence)
        window = WindowWords(segments, seek / 100, num_frames, len(mels), sot, language,
                             samples=audios[clip][seek * 160 : (seek + num_frames) * 160],
                             last_speech_timestamp=last_speech)
        built.append((clip, [s["words"] for s in after], window))
        mels.append(model_window(mel, seek, num_frames))
    encode = jax.jit(lambda p, m: model.module.apply({"params": p}, m, method=Whisper.encode))
    return encode(model.params, np.stack(mels)), built, np.stack(mels)


def _aligned(model, audio, built, options):
    copies = [dataclasses.replace(w, segments=[dataclasses.replace(s) for s in w.segments]) for _, _, w in built]
    timing.add_word_timestamps(model, audio, copies, options)
    return copies


def test_parity_with_faster_whisper(model, windows):
    audio, built, _ = windows
    ours = _aligned(model, audio, built, WordOptions(refine=False))
    same = total = 0
    worst = 0.0
    for (_, expected, _), window in zip(built, ours):
        for theirs, segment in zip(expected, window.segments):
            total += max(len(theirs), len(segment.words))
            for a, b in zip(theirs, segment.words):
                gap = max(abs(a["start"] - b.start), abs(a["end"] - b.end))
                same += a["word"] == b.word and gap <= 0.02 and abs(a["probability"] - b.probability) < 0.01
                worst = max(worst, gap)
    print(f"{model.name}: {same}/{total} words identical within 20 ms, largest gap {worst * 1000:.0f} ms")
    assert total >= 30 and same >= 0.95 * total


def test_one_call_equals_window_by_window(model, windows):
    audio, built, _ = windows
    picked = [built[i] for i in (4, 1, 3)]  # rows out of order, and not every row of the batch
    together = _aligned(model, audio, picked, WordOptions(refine=False))
    for entry, window in zip(picked, together):
        single = [(None, None, dataclasses.replace(entry[2], row=0))]
        alone = _aligned(model, audio[window.row : window.row + 1], single, WordOptions(refine=False))[0]
        assert [s.words for s in alone.segments] == [s.words for s in window.segments]


def test_refined_words_are_ordered_inside_their_segments_and_on_the_speech(model, windows):
    audio, built, _ = windows
    raw = _aligned(model, audio, built, WordOptions(refine=False))
    refined = _aligned(model, audio, built, WordOptions())
    moved = 0
    for r, w in zip(raw, refined):
        words = [x for s in w.segments for x in s.words]
        assert all(a.start <= a.end <= b.start for a, b in zip(words, words[1:]))
        for s in w.segments:
            assert all(s.start <= x.start and x.end <= s.end for x in s.words)
        old = [x for s in r.segments for x in s.words]
        assert [(a.word, a.probability) for a in old] == [(b.word, b.probability) for b in words]
        moved += sum(a.start != b.start or a.end != b.end for a, b in zip(old, words))
    assert moved > 0
    go = next(w for (clip, _, _), w in zip(built, refined) if clip == "goforward.flac").segments[0].words[0]
    assert go.word == " Go" and 0.4 <= go.start <= 0.6  # speech starts at 0.5 s; OpenAI says 0.0


def test_alignment_pass_shapes_for_a_128_mel_bfloat16_model():
    from whisperjax_cli.dims import OFFICIAL_DIMS
    from whisperjax_cli.model import Whisper

    dims = OFFICIAL_DIMS["large-v3"]
    module = Whisper(dims, jnp.bfloat16)
    mel = jax.ShapeDtypeStruct((1, 3000, dims.n_mels), jnp.bfloat16)
    tokens = jax.ShapeDtypeStruct((1, 5), jnp.int32)
    params = jax.eval_shape(lambda m, t: module.init(jax.random.PRNGKey(0), m, t), mel, tokens)["params"]
    batch, length = 2, 32
    spec = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    heads = ((30, 2), (31, 5))
    audio = spec((batch, dims.n_audio_ctx, dims.n_audio_state), jnp.bfloat16)
    cross = jax.eval_shape(lambda p, a: module.apply({"params": p}, a, method=Whisper.cross_kv), params, audio)
    probs, cost = alignment.alignment_pass.eval_shape(
        module, params, cross, spec(()),
        spec((batch, length)), spec((batch,)), spec((batch,)), spec((batch,)), spec((alignment.logit_rows(batch),)), spec(()),
        heads=heads, eot=50257, width=7)
    assert probs.shape == (alignment.logit_rows(batch),) and probs.dtype == jnp.float32
    assert cost.shape == (batch, length, dims.n_audio_ctx) and cost.dtype == jnp.float32
    trace = alignment.dtw_trace.eval_shape(cost)
    assert trace.shape == (length + dims.n_audio_ctx, batch, length + 1) and trace.dtype == jnp.int8


@pytest.mark.parametrize("dtype", ["bfloat16", "mixed"])
def test_bfloat16_and_mixed_compute_time_words_alike(model, windows, dtype):
    if model.name != "tiny.en":
        pytest.skip("one model is enough for the dtypes")
    from whisperjax_cli.model import Whisper

    _, built, mels = windows
    other = _load(model.name, dtype)
    encoded = jax.jit(lambda p, m: other.module.apply({"params": p}, m, method=Whisper.encode))(other.params, mels)
    ours = _aligned(other, encoded, built, WordOptions(refine=False))
    pairs = [(a, b) for (_, expected, _), w in zip(built, ours) for theirs, s in zip(expected, w.segments)
             for a, b in zip(theirs, s.words)]
    close = sum(a["word"] == b.word and abs(a["start"] - b.start) <= 0.04 and abs(a["end"] - b.end) <= 0.04
                for a, b in pairs)
    assert len(pairs) >= 30 and close >= 0.9 * len(pairs)
