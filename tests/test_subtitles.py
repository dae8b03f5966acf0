"""Word-level subtitles: openai-whisper's line and cue limits read back with pysubs2, highlighted
words, and the words of a real transcript in JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pysubs2
import pytest

from whisperjax_cli.errors import UsageError
from whisperjax_cli.results import Segment, Transcript, Word
from whisperjax_cli.writers import SubtitleOptions, get_writer, word_cues, write_transcript

DATA = Path(__file__).parent / "data"
TEXT = ("the quick brown fox jumps over the lazy dog while an extraordinarily long word "
        "appears now and then, and the narrator keeps talking about foxes and dogs")


def _segment(i, words, text=None) -> Segment:
    text = "".join(w.word for w in words) if text is None else text
    return Segment(id=i, seek=0, start=words[0].start, end=words[-1].end, text=text, tokens=[], temperature=0.0,
                   avg_logprob=-0.2, compression_ratio=1.3, no_speech_prob=0.01, words=words)


def _transcript(segments) -> Transcript:
    return Transcript(text="".join(s.text for s in segments), segments=segments, language="en",
                      language_probability=None, duration=60.0, model="tiny.en")


@pytest.fixture
def transcript():
    """Three segments of words 0.3 s apart; a 4 s pause before the last one, and the last word of
    each segment ending after the next segment's first starts (as OpenAI's times can)."""
    words, t = [], 0.5
    for k, token in enumerate(TEXT.split()):
        if k == 20:
            t += 4.0
        words.append(Word(round(t, 2), round(t + 0.28, 2), " " + token, 0.9))
        t += 0.3
    segments = [words[:9], words[9:20], words[20:]]
    for first, second in zip(segments, segments[1:]):
        first[-1].end = second[0].start + 0.05
    return _transcript([_segment(i, s) for i, s in enumerate(segments)])


def _events(text, fmt):
    return list(pysubs2.SSAFile.from_string(text, format_=fmt))


def _check_ordered(events):
    for a, b in zip(events, events[1:]):
        assert a.start <= b.start and a.end <= b.start, (a, b)


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
@pytest.mark.parametrize("width, count", [(20, 2), (42, 1), (12, 3)])
def test_line_width_and_count(transcript, fmt, width, count):
    options = SubtitleOptions(max_line_width=width, max_line_count=count)
    events = _events(get_writer(fmt).render(transcript, options), fmt)
    words = []
    for event in events:
        lines = event.plaintext.split("\n")
        assert 1 <= len(lines) <= count
        for line in lines:
            assert line == line.strip() and (len(line) <= width or " " not in line), line
        words += event.plaintext.split()
    assert words == TEXT.split()  # every word once, in order, none split
    _check_ordered(events)
    # a pause of more than 3 s ends a cue
    assert any(e.plaintext.split()[0] == TEXT.split()[20] for e in events)


def test_line_width_alone_keeps_segments(transcript):
    events = _events(get_writer("srt").render(transcript, SubtitleOptions(max_line_width=16)), "srt")
    assert len(events) == 3
    assert [e.plaintext.replace("\n", " ") for e in events] == [s.text.strip() for s in transcript.segments]
    assert all(len(line) <= 16 or " " not in line for e in events for line in e.plaintext.split("\n"))
    _check_ordered(events)


def test_max_words_per_line(transcript):
    events = _events(get_writer("srt").render(transcript, SubtitleOptions(max_words_per_line=4)), "srt")
    assert all(1 <= len(e.plaintext.split()) <= 4 and "\n" not in e.plaintext for e in events)
    assert [w for e in events for w in e.plaintext.split()] == TEXT.split()
    _check_ordered(events)


def test_highlight_words(transcript):
    text = get_writer("vtt").render(transcript, SubtitleOptions(highlight_words=True, max_line_width=30,
                                                                max_line_count=2))
    cues = [block.split("\n", 1)[1] for block in text.split("\n\n")[1:]]
    underlined = [re.findall(r"<u>(.*?)</u>", c) for c in cues]
    assert all(len(u) <= 1 for u in underlined)
    assert [u[0] for u in underlined if u] == TEXT.split()  # each word once, in order
    assert any(not u for u in underlined)  # the gaps between words show the plain line
    events = _events(text, "vtt")
    _check_ordered(events)
    first = next(e for e, u in zip(events, underlined) if u)
    assert (first.start, first.end) == (500, 780)


def test_without_options_cues_stay_segments(transcript):
    for options in (None, SubtitleOptions()):
        events = _events(get_writer("srt").render(transcript, options), "srt")
        assert [e.plaintext for e in events] == [s.text.strip() for s in transcript.segments]
    assert get_writer("srt").render(transcript) == get_writer("srt").render(transcript, SubtitleOptions())


def test_write_transcript_passes_the_options(transcript, tmp_path):
    paths = write_transcript(transcript, tmp_path, "talk", ["srt", "txt"], SubtitleOptions(max_words_per_line=1))
    assert len(_events(paths[0].read_text(encoding="utf-8"), "srt")) == len(TEXT.split())


def test_word_cues_never_overlap_even_when_words_do():
    words = [Word(1.0, 2.0, " a", 0.9), Word(1.5, 1.8, " b", 0.9), Word(1.2, 3.0, " c", 0.9)]
    cues = word_cues([_segment(0, words)], SubtitleOptions(max_words_per_line=1))
    assert [c[2] for c in cues] == ["a", "b", "c"]
    for (s1, e1, _), (s2, e2, _) in zip(cues, cues[1:]):
        assert s1 <= e1 <= s2 <= e2


def test_subtitle_options_validation():
    for bad in (dict(max_line_width=0), dict(max_line_count=-1), dict(max_words_per_line=2.5),
                dict(highlight_words="yes"), dict(max_line_width=True)):
        with pytest.raises(UsageError):
            SubtitleOptions(**bad)
    assert not SubtitleOptions().uses_words and SubtitleOptions(max_line_count=2).uses_words


def test_json_words_of_a_real_transcript(tmp_path):
    """wjx's own decoding of a real clip, its words timed from the window's encoder output."""
    import jax
    import numpy as np

    from whisperjax_cli import timing
    from whisperjax_cli.audio import load_audio
    from whisperjax_cli.features import N_SAMPLES, LogMelWindows, model_window
    from whisperjax_cli.model import Whisper

    try:
        from whisperjax_cli.loading import load_model
        from whisperjax_cli.longform import transcribe
    except ImportError:  # before models.py and transcribe.py were renamed
        from whisperjax_cli.models import load_model
        from whisperjax_cli.transcribe import transcribe

    model = load_model("tiny.en", dtype="float32")
    audio = load_audio(DATA / "cards-005.flac")
    transcript = transcribe(model, audio, temperature=0.0)
    mel = LogMelWindows(audio, model.n_mels, padding=N_SAMPLES)
    frames = mel.n_frames - N_SAMPLES // 160
    encoded = jax.jit(lambda p, m: model.module.apply({"params": p}, m, method=Whisper.encode))(
        model.params, model_window(mel, 0, frames)[None])
    window = timing.WindowWords(transcript.segments, 0.0, frames, 0, tuple(model.tokenizer.sot_sequence), "en",
                                samples=audio)
    timing.add_word_timestamps(model, encoded, [window])
    data = json.loads(write_transcript(transcript, tmp_path, "cards", ["json"])[0].read_text(encoding="utf-8"))
    words = [w for s in data["segments"] for w in s["words"]]
    assert len(words) >= 6 and all(list(w) == ["word", "start", "end", "probability"] for w in words)
    assert "".join(w["word"] for w in words).strip() == transcript.text.strip()
    for segment in data["segments"]:
        assert all(segment["start"] <= w["start"] <= w["end"] <= segment["end"] for w in segment["words"])
    assert all(a["end"] <= b["start"] for a, b in zip(words, words[1:]))
    assert all(0 < w["probability"] <= 1 for w in words) and np.isfinite([w["start"] for w in words]).all()
