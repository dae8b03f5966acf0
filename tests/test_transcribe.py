"""Long-form transcription: OpenAI's seek loop against faster-whisper, batched mode, options."""

from __future__ import annotations

import types

import jax
import numpy as np
import pysubs2
import pytest

from conftest import CLIPS, faster_whisper_model
from whisperjax_cli.packing import ENERGY_BLOCK, frame_energy
from whisperjax_cli.streams import Stream
from whisperjax_cli.longform import transcribe, transcribe_files, transcribe_segments
from whisperjax_cli.writers import get_writer


@pytest.fixture(scope="module")
def long_audio(clip_audio):
    """Every English dev clip with 2 s pauses between them: ~52 s, two windows or more.

    No pause after the last clip: a final window of a few frames of silence is where the two
    implementations may hallucinate differently, which says nothing about the seek loop.
    """
    parts = []
    for clip in CLIPS:
        if "russian" not in clip.name:
            parts += [clip_audio[clip.name], np.zeros(2 * 16000, np.float32)]
    return np.concatenate(parts[:-1])


@pytest.fixture(scope="module")
def sequential(tiny_en, long_audio):
    return transcribe(tiny_en, long_audio)


def _check_times(result, duration):
    last_start = 0.0
    for s in result.segments:
        assert 0 <= s.start <= s.end <= duration + 1e-6, s
        assert s.start >= last_start, "segments go backwards"
        last_start = s.start


def test_sequential_long_form_matches_faster_whisper(tiny_en, long_audio, sequential):
    fw = faster_whisper_model(tiny_en)
    theirs = list(fw.transcribe(long_audio, beam_size=1)[0])
    assert len(sequential.segments) == len(theirs)
    for ours, ref in zip(sequential.segments, theirs):
        assert abs(ours.start - ref.start) <= 0.5, (ours, ref)
        assert ours.text.strip() == ref.text.strip()
    _check_times(sequential, len(long_audio) / 16000)
    assert sequential.segments[-1].seek > 0  # more than one window


def test_segment_starts_within_half_a_second_of_faster_whisper_on_every_clip(tiny_en, clip_audio):
    """Clips where a side fell back to sampling (tiny.en on the Russian clip) are random draws on
    both sides, so only greedy results are compared; nearly every clip is."""
    fw = faster_whisper_model(tiny_en)
    compared = 0
    for clip in CLIPS:
        audio = clip_audio[clip.name]
        ours = transcribe(tiny_en, audio).segments
        theirs = list(fw.transcribe(audio, beam_size=1)[0])
        if any(s.temperature > 0 for s in ours) or any(s.temperature > 0 for s in theirs):
            continue
        compared += 1
        assert len(ours) == len(theirs), clip.name
        for a, b in zip(ours, theirs):
            assert abs(a.start - b.start) <= 0.5, (clip.name, a, b)
    assert compared >= len(CLIPS) - 2


def test_batched_mode_keeps_the_words_and_the_order(tiny_en, long_audio, sequential, monkeypatch):
    import whisperjax_cli.longform as module

    seen, step = [], module.Transcriber.step

    def counting_step(self, files, streams):
        seen.append(len(streams))
        return step(self, files, streams)

    monkeypatch.setattr(module.Transcriber, "step", counting_step)
    batched = transcribe(tiny_en, long_audio, mode="batched", batch_size=4)
    # ~52 s, its 2 s pauses shortened to 0.4 s: two windows, decoded side by side, once.
    assert seen == [2]
    _check_times(batched, len(long_audio) / 16000)
    words = lambda r: [w.strip(".,").lower() for w in r.text.split()]  # noqa: E731
    ref, got = words(sequential), words(batched)
    missing = sum(1 for w in set(ref) if w not in got)
    assert missing <= 2, (ref, got)
    assert len(got) <= len(ref) + 3  # nothing hallucinated either
    assert [s.id for s in batched.segments] == list(range(len(batched.segments)))
    assert {s.temperature for s in batched.segments} == {0.0}


def test_mixed_precision_batched_mode_keeps_the_words(long_audio, sequential):
    """dtype="mixed" (what batched CLI runs pick on a CPU with bfloat16 dot instructions): the
    encoder's products and the output projection in bfloat16. The words stay those of the
    float32 sequential transcript (itself faster-whisper's, test above)."""
    from whisperjax_cli.loading import load_model

    mixed = load_model("tiny.en", dtype="mixed")
    batched = transcribe(mixed, long_audio, mode="batched", batch_size=4)
    _check_times(batched, len(long_audio) / 16000)
    words = lambda r: [w.strip(".,").lower() for w in r.text.split()]  # noqa: E731
    ref, got = words(sequential), words(batched)
    assert sum(1 for w in set(ref) if w not in got) <= 2, (ref, got)
    assert len(got) <= len(ref) + 3  # nothing hallucinated either


def test_frame_energy_in_blocks_equals_the_whole_file_at_once():
    audio = np.random.default_rng(1).standard_normal(160 * (2 * ENERGY_BLOCK + 17) + 77).astype(np.float32)
    audio[160 * ENERGY_BLOCK :] *= 1e-3  # a quiet second part: the blocks must not share a scale
    n = len(audio) // 160
    whole = np.log10(np.mean(audio[: n * 160].reshape(n, 160).astype(np.float64) ** 2, axis=1) + 1e-10)
    assert np.array_equal(frame_energy(audio), whole)


def test_looping_rows_stop_early_in_both_modes_unless_asked(tiny_en):
    from whisperjax_cli.decoding import LOOP_SPAN
    from whisperjax_cli.longform import Transcriber
    from whisperjax_cli.options import TranscribeOptions

    for mode in ("sequential", "batched"):
        assert Transcriber(tiny_en, TranscribeOptions(mode=mode)).decoder.config.loop_span == LOOP_SPAN
        assert Transcriber(tiny_en, TranscribeOptions(mode=mode, stop_loops=False)).decoder.config.loop_span == 0


def test_segments_are_a_lazy_generator(tiny_en, long_audio, sequential):
    segments = transcribe_segments(tiny_en, long_audio)
    assert isinstance(segments, types.GeneratorType)
    first = next(segments)
    assert first.text == sequential.segments[0].text
    assert [first.text, *(s.text for s in segments)] == [s.text for s in sequential.segments]


def test_many_files_in_one_batch_equal_one_by_one(tiny_en, clip_audio, sequential, long_audio):
    sources = [clip_audio["goforward.flac"], long_audio, clip_audio["something.wav"]]
    done = {e.index: e.transcript for e in transcribe_files(tiny_en, sources, batch_size=4) if e.transcript}
    assert done[1].text == sequential.text
    assert done[0].text == transcribe(tiny_en, clip_audio["goforward.flac"]).text


def test_a_cancelled_file_ends_with_cancelled_and_the_others_finish(tiny_en, clip_audio, sequential, long_audio):
    """Transcriber.cancel, from another thread as a server calls it: the long file stops after its
    first window with one Cancelled event, the short one is transcribed as on its own."""
    import threading

    from whisperjax_cli.longform import Cancelled, Transcriber
    from whisperjax_cli.options import TranscribeOptions

    transcriber = Transcriber(tiny_en, TranscribeOptions(batch_size=2))
    assert transcriber.cancel(0) is False  # nothing open yet
    events = []
    for event in transcriber.run([long_audio, clip_audio["goforward.flac"]]):
        events.append(event)
        if event.index == 0 and event.segments and event.error is None:
            assert transcriber.open_files == 2
            worker = threading.Thread(target=lambda: events.append(transcriber.cancel(0)))
            worker.start()
            worker.join()
    assert events.count(True) == 1  # the cancel found the file open
    errors = [e for e in events if not isinstance(e, bool) and e.error is not None]
    assert [(e.index, type(e.error)) for e in errors] == [(0, Cancelled)]
    assert not any(not isinstance(e, bool) and e.index == 0 and e.transcript is not None for e in events)
    done = [e.transcript for e in events if not isinstance(e, bool) and e.transcript is not None]
    assert [t.text for t in done] == [transcribe(tiny_en, clip_audio["goforward.flac"]).text]
    decoded = [g for e in events if not isinstance(e, bool) and e.index == 0 for g in e.segments]
    assert 0 < len(decoded) < len(sequential.segments)  # stopped part way
    assert transcriber.open_files == 0 and transcriber.cancel(1) is False


def test_clip_timestamps_restrict_the_window(tiny_en, long_audio):
    result = transcribe(tiny_en, long_audio, clip_timestamps="20,30")
    assert result.segments and all(20 <= s.start and s.end <= 30 for s in result.segments)


def test_temperature_fallback_samples_with_an_explicit_key(tiny_en, clip_audio):
    audio = clip_audio["cards-005.flac"]
    # A compression-ratio threshold of 0 rejects every decode, so the last temperature wins.
    opts = dict(temperature=(0.0, 0.5), compression_ratio_threshold=0.0, best_of=2)
    a = transcribe(tiny_en, audio, key=jax.random.PRNGKey(1), **opts)
    b = transcribe(tiny_en, audio, key=jax.random.PRNGKey(1), **opts)
    assert a.segments[0].temperature == 0.5 and a.text == b.text


def test_initial_prompt_is_used(tiny_en, clip_audio):
    audio = clip_audio["cards-002.flac"]
    plain = transcribe(tiny_en, audio).text
    prompted = transcribe(tiny_en, audio, initial_prompt="Four, queen of clubs.").text
    assert plain != prompted


def test_real_srt_and_vtt_parse_back(sequential):
    for fmt in ("srt", "vtt"):
        subs = pysubs2.SSAFile.from_string(get_writer(fmt).render(sequential), format_=fmt)
        assert len(subs) == len(sequential.segments)
        for event, seg in zip(subs, sequential.segments):
            assert event.start == round(seg.start * 1000) and event.end == round(seg.end * 1000)
            assert event.plaintext.strip() == seg.text.strip()


def test_a_window_skipped_as_silence_resets_the_prompt_only_if_it_had_text(tiny_en):
    """No-speech skip (p > 0.6, avg logprob < -1): seek moves a whole window either way; the
    prompt is dropped when the model wrote text there, kept when it wrote none."""
    from whisperjax_cli.window_decoder import DecodingResult
    from whisperjax_cli.longform import Transcriber

    transcriber = Transcriber(tiny_en)
    for text, reset in ((" and the", True), ("", False)):
        stream = Stream(0, [(0, 9000)], [1, 2, 3])
        result = DecodingResult([], text, -3.0, -1.5, 0.9, 0.0, 1.0)
        transcriber._advance(None, stream, 3000, result)
        assert stream.seek == 3000 and stream.segments == []
        assert stream.prompt_reset_since == (3 if reset else 0), text


def test_threads_share_a_model_and_get_their_own_results(tiny_en, clip_audio):
    """No process-global state on the decode path: several threads transcribing with one model
    at once (a server, a notebook) get what each gets alone; loading is thread-safe too."""
    from concurrent.futures import ThreadPoolExecutor

    from whisperjax_cli.loading import load_model
    from whisperjax_cli.longform import transcribe
    from whisperjax_cli.options import TranscribeOptions

    names = ["goforward.flac", "something.wav", "cards-005.flac", "numbers.flac"]
    options = [TranscribeOptions(temperature=0.0), TranscribeOptions(temperature=0.0, beam_size=2),
               TranscribeOptions(temperature=0.0, mode="batched"), TranscribeOptions(without_timestamps=True)]
    alone = [transcribe(tiny_en, clip_audio[n], options=o).text for n, o in zip(names, options)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda a: transcribe(tiny_en, clip_audio[a[0]], options=a[1]).text,
                                 zip(names, options)))
        models = list(pool.map(lambda _: load_model("tiny.en"), range(2)))
    assert together == alone and all(alone)
    assert all(m.dims == tiny_en.dims for m in models)


def _speech_between_noise(clip_audio):
    """Speech clips between long stretches of loud non-speech (white noise, a held tone, random
    crackle): ``(audio, [(start, end) of each clip in seconds], [its words])``."""
    rng = np.random.default_rng(3)
    rate = 16000
    noise = (rng.standard_normal(12 * rate) * 0.05).astype(np.float32)
    tone = (0.2 * np.sin(2 * np.pi * 330 * np.arange(10 * rate) / rate)).astype(np.float32)
    crackle = np.where(rng.random(10 * rate) < 0.002, rng.uniform(-0.6, 0.6, 10 * rate), 0).astype(np.float32)
    parts, spans, t = [], [], 0.0
    for filler, name in ((noise, "goforward.flac"), (tone, "something.wav"), (crackle, "cards-005.flac")):
        parts += [filler, clip_audio[name]]
        t += len(filler) / rate
        spans.append((t, t + len(clip_audio[name]) / rate))
        t += len(clip_audio[name]) / rate
    parts.append(noise)
    return np.concatenate(parts), spans


def test_vad_decodes_speech_only_and_maps_times_back(tiny_en, clip_audio):
    """With the VAD (sequential --vad, and batched mode's default), no text is placed in the
    non-speech and every segment lies on the speech it came from, in the file's own times."""
    from whisperjax_cli.longform import transcribe

    audio, spans = _speech_between_noise(clip_audio)
    for mode, vad in (("sequential", True), ("batched", None)):
        result = transcribe(tiny_en, audio, mode=mode, vad_filter=vad, temperature=0.0)
        words = result.text.lower()
        assert "forward" in words and "somewhere" in words and "spades" in words, (mode, result.text)
        for segment in result.segments:
            # Each segment starts and ends within a speech span (padding: 0.4 s, and a segment
            # may run across the non-speech between two spans, as faster-whisper's do).
            assert any(s - 0.6 <= segment.start <= e for s, e in spans), (mode, segment)
            assert any(s <= segment.end <= e + 0.6 for s, e in spans), (mode, segment)
        assert result.duration == pytest.approx(len(audio) / 16000, abs=0.01)


def test_the_first_window_reuses_what_language_detection_encoded(base, long_audio, clip_audio, monkeypatch):
    """A multilingual model detects the language on frames [0, 3000) of a file of 30 s or more,
    the very window its decode starts with: that window is not encoded again, and the text is
    the one encoding it again gives. A shorter file's detection window differs by one frame
    (faster-whisper's), so there nothing is reused."""
    from whisperjax_cli.streams import FileState
    from whisperjax_cli.window_decoder import WindowDecoder

    encoded, decoded = [], []
    encode, decode = WindowDecoder.encode, WindowDecoder.decode_keeping_cross
    monkeypatch.setattr(WindowDecoder, "encode", lambda self, mels: encoded.append(len(mels)) or encode(self, mels))
    monkeypatch.setattr(WindowDecoder, "decode_keeping_cross",
                        lambda self, audio, n, *a, **k: decoded.append(n) or decode(self, audio, n, *a, **k))

    def run(audio):
        encoded.clear(), decoded.clear()
        text = transcribe(base, audio, temperature=0.0).text
        return text, sum(encoded), sum(decoded)

    reused, encodes, windows = run(long_audio)
    assert windows >= 2 and encodes == windows - 1
    short, encodes, windows = run(clip_audio["goforward.flac"])
    assert encodes == windows
    encoded.clear(), decoded.clear()  # both files in one batch: the known window among encoded ones
    done = {e.index: e.transcript.text for e in transcribe_files(base, [long_audio, clip_audio["goforward.flac"]],
                                                                 batch_size=2, temperature=0.0) if e.transcript}
    assert done == {0: reused, 1: short} and sum(encoded) == sum(decoded) - 1
    monkeypatch.setattr(FileState, "take_first_audio", lambda self, s, size: None)
    again, encodes, windows = run(long_audio)
    assert encodes == windows and again == reused
