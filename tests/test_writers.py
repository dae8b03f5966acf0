"""Writers: exact output shapes, round trips through pysubs2, stems and atomic files."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import pysubs2
import pytest

from whisperjax_cli import writers
from whisperjax_cli.errors import UsageError
from whisperjax_cli.results import Segment, Transcript, Word
from whisperjax_cli.writers import (
    ALL_FORMATS,
    FORMATS,
    clean_times,
    expand_formats,
    format_segment_jsonl,
    format_timestamp,
    get_writer,
    output_path,
    output_stems,
    write_atomic,
    write_transcript,
)


def _segment(i, start, end, text, **fields):
    values = dict(
        id=i,
        seek=0,
        start=start,
        end=end,
        text=text,
        tokens=[50364 + i, 400, 50414],
        temperature=0.0,
        avg_logprob=-0.25,
        compression_ratio=1.5,
        no_speech_prob=0.01,
    )
    values.update(fields)
    return Segment(**values)


def _transcript(segments, **fields):
    values = dict(
        text="".join(s.text for s in segments),
        segments=segments,
        language="fr",
        language_probability=0.97,
        duration=3710.0,
        model="tiny",
    )
    values.update(fields)
    return Transcript(**values)


@pytest.fixture
def transcript():
    words = [Word(-0.1, 0.8, " Héllo", 0.9), Word(1.0, 0.5, " wörld", float("nan"))]
    return _transcript(
        [
            _segment(0, 0.0, 2.5, " Héllo wörld — 日本語 ", words=words),
            _segment(1, 2.5, 5.0, " a --> b, c--->d "),
            _segment(2, 3700.25, 3702.0, " Over an hour\n\n  second line \r\n", avg_logprob=-math.inf),
            _segment(3, -0.5, 1.0, " negative start ", compression_ratio=math.nan),
            _segment(4, 10.0, 9.0, " end before start "),
            _segment(5, 11.0, 12.0, "   "),
            _segment(6, 12.0, None, "no end\twith tab"),
        ]
    )


# (start ms, end ms, text) of every cue the fixture should give; segment 5 has no text.
EXPECTED_CUES = [
    (0, 2500, "Héllo wörld — 日本語"),
    (2500, 5000, "a -> b, c->d"),
    (3_700_250, 3_702_000, "Over an hour\nsecond line"),
    (0, 1000, "negative start"),
    (10_000, 10_000, "end before start"),
    (12_000, 12_000, "no end\twith tab"),
]


# --- timestamps --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seconds, expected",
    [
        (0, "00:00:00,000"),
        (3661.5, "01:01:01,500"),
        # 1.0005 * 1000 is exactly 1000.5 in floats and round() takes ties to even, as in
        # openai-whisper: 1000 ms, not 1001.
        (1.0005, "00:00:01,000"),
        (1.0006, "00:00:01,001"),
        (59.9996, "00:01:00,000"),  # milliseconds carry into the minutes
        (360_000.0, "100:00:00,000"),
    ],
)
def test_format_timestamp(seconds, expected):
    assert format_timestamp(seconds) == expected


def test_format_timestamp_hours_only_when_needed():
    assert format_timestamp(61.0, always_include_hours=False, decimal_marker=".") == "01:01.000"
    assert format_timestamp(3600.0, always_include_hours=False, decimal_marker=".") == (
        "01:00:00.000"
    )


@pytest.mark.parametrize("seconds", [-0.001, math.nan, math.inf])
def test_format_timestamp_rejects_bad_times(seconds):
    with pytest.raises(ValueError):
        format_timestamp(seconds)


@pytest.mark.parametrize(
    "start, end, expected",
    [
        (1.0, 2.0, (1.0, 2.0)),
        (-0.5, 1.0, (0.0, 1.0)),
        (10.0, 9.0, (10.0, 10.0)),
        (3.0, None, (3.0, 3.0)),
        (None, None, (0.0, 0.0)),
        (math.nan, math.inf, (0.0, 0.0)),
        (-2.0, -1.0, (0.0, 0.0)),
    ],
)
def test_clean_times(start, end, expected):
    assert clean_times(start, end) == expected


# --- srt / vtt ---------------------------------------------------------------------------------


def _parsed_cues(text, fmt):
    subs = pysubs2.SSAFile.from_string(text, format_=fmt)
    return [(event.start, event.end, event.plaintext) for event in subs]


def test_srt_parses_back(transcript):
    text = get_writer("srt").render(transcript)
    assert _parsed_cues(text, "srt") == EXPECTED_CUES


def test_vtt_parses_back(transcript):
    text = get_writer("vtt").render(transcript)
    assert _parsed_cues(text, "vtt") == EXPECTED_CUES


def test_srt_exact_shape():
    transcript = _transcript([_segment(0, 0.0, 1.5, " Hi "), _segment(1, 3661.5, 3662.0, "Yo")])
    assert get_writer("srt").render(transcript) == (
        "1\n00:00:00,000 --> 00:00:01,500\nHi\n"
        "\n"
        "2\n01:01:01,500 --> 01:01:02,000\nYo\n"
    )


def test_vtt_exact_shape_hours_always():
    transcript = _transcript([_segment(0, 0.0, 1.5, " Hi "), _segment(1, 3661.5, 3662.0, "Yo")])
    assert get_writer("vtt").render(transcript) == (
        "WEBVTT\n"
        "\n"
        "00:00:00.000 --> 00:00:01.500\nHi\n"
        "\n"
        "01:01:01.500 --> 01:01:02.000\nYo\n"
    )


@pytest.mark.parametrize("fmt, header_blocks", [("srt", 0), ("vtt", 1)])
def test_cue_blocks_are_well_formed(transcript, fmt, header_blocks):
    text = get_writer(fmt).render(transcript)
    blocks = text.rstrip("\n").split("\n\n")[header_blocks:]
    assert len(blocks) == len(EXPECTED_CUES)
    for number, block in enumerate(blocks, start=1):
        lines = block.split("\n")
        timing = lines[1] if fmt == "srt" else lines[0]
        cue_text = lines[2:] if fmt == "srt" else lines[1:]
        if fmt == "srt":
            assert lines[0] == str(number)
        assert timing.count("-->") == 1
        assert cue_text and all(line.strip() for line in cue_text)  # no blank line inside a cue
        assert not any("-->" in line for line in cue_text)
        assert all(line == line.strip() for line in cue_text)
    assert "None" not in text and "-0" not in text


def test_empty_transcript():
    empty = _transcript([], text="")
    assert get_writer("srt").render(empty) == ""
    assert get_writer("vtt").render(empty) == "WEBVTT\n"
    assert get_writer("txt").render(empty) == ""
    assert get_writer("tsv").render(empty) == "start\tend\ttext\n"
    assert json.loads(get_writer("json").render(empty))["segments"] == []
    assert get_writer("jsonl").render(empty) == ""


# --- txt / tsv ---------------------------------------------------------------------------------


def test_txt_one_stripped_line_per_segment(transcript):
    lines = get_writer("txt").render(transcript).split("\n")
    assert lines[-1] == ""  # ends with a newline
    assert lines[:-1] == [
        "Héllo wörld — 日本語",
        "a --> b, c--->d",  # plain text keeps what was said
        "Over an hour second line",
        "negative start",
        "end before start",
        "",
        "no end\twith tab",
    ]


def test_tsv_integer_milliseconds(transcript):
    rows = get_writer("tsv").render(transcript).split("\n")
    assert rows[0] == "start\tend\ttext"
    assert rows[-1] == ""
    cells = [row.split("\t") for row in rows[1:-1]]
    assert all(len(row) == 3 for row in cells)  # tabs in the text did not add columns
    assert [(int(s), int(e)) for s, e, _ in cells] == [
        (0, 2500),
        (2500, 5000),
        (3_700_250, 3_702_000),
        (0, 1000),
        (10_000, 10_000),
        (11_000, 12_000),
        (12_000, 12_000),
    ]
    assert cells[2][2] == "Over an hour second line"
    assert cells[6][2] == "no end with tab"


# --- json / jsonl ------------------------------------------------------------------------------

OPENAI_SEGMENT_KEYS = {
    "id", "seek", "start", "end", "text", "tokens", "temperature",
    "avg_logprob", "compression_ratio", "no_speech_prob",
}  # fmt: skip


def test_json_keys_unicode_and_no_nan(transcript, tmp_path):
    paths = write_transcript(transcript, tmp_path, "talk", ["json"])
    raw = paths[0].read_bytes()
    assert raw.startswith(b"{")  # no BOM
    assert "日本語".encode() in raw and b"\\u" not in raw
    assert b"NaN" not in raw and b"Infinity" not in raw
    data = json.loads(raw.decode("utf-8"))
    assert {"text", "segments", "language"} <= data.keys()
    assert {"language_probability", "duration", "model"} <= data.keys()
    assert (data["language"], data["language_probability"], data["model"]) == ("fr", 0.97, "tiny")
    assert len(data["segments"]) == len(transcript.segments)  # empty segments are kept
    for seg in data["segments"]:
        assert OPENAI_SEGMENT_KEYS <= seg.keys()
        assert 0 <= seg["start"] <= seg["end"]
    assert data["segments"][2]["avg_logprob"] is None
    assert data["segments"][3]["compression_ratio"] is None
    assert (data["segments"][3]["start"], data["segments"][6]["end"]) == (0.0, 12.0)
    assert data["segments"][1]["text"] == " a --> b, c--->d "  # json keeps the raw text
    words = data["segments"][0]["words"]
    assert [(w["start"], w["end"], w["probability"]) for w in words] == [
        (0.0, 0.8, 0.9),
        (1.0, 1.0, None),
    ]
    assert "words" not in data["segments"][1]


def test_json_accepts_numpy_values():
    np = pytest.importorskip("numpy", reason="numpy is what decoding hands over")
    segment = _segment(
        0,
        np.float32(0.5),
        np.float32(1.25),
        "x",
        tokens=np.array([1, 2], dtype=np.int32),
        avg_logprob=np.float32(-np.inf),
    )
    data = json.loads(get_writer("json").render(_transcript([segment])))
    seg = data["segments"][0]
    assert (seg["start"], seg["end"], seg["tokens"], seg["avg_logprob"]) == (0.5, 1.25, [1, 2], None)


def test_jsonl_segment_line():
    segment = _segment(0, 1.0, 2.0, "日本語\u2028next\u2029para\u0085nel\nnewline")
    line = format_segment_jsonl(segment, file="a/talk.wav")
    assert len(line.splitlines()) == 1 and not line.endswith("\n")
    assert "日本語" in line
    record = json.loads(line)
    assert next(iter(record)) == "file" and record["file"] == "a/talk.wav"
    assert record["text"] == segment.text
    assert OPENAI_SEGMENT_KEYS <= record.keys()
    assert "file" not in json.loads(format_segment_jsonl(segment))


def test_jsonl_writer_one_line_per_segment(transcript):
    text = get_writer("jsonl").render(transcript)
    lines = text.splitlines()
    assert text.endswith("\n") and len(lines) == len(transcript.segments)
    assert [json.loads(line)["id"] for line in lines] == list(range(len(transcript.segments)))


# --- registry and paths ------------------------------------------------------------------------


def test_get_writer_and_formats(transcript):
    for fmt in FORMATS:
        writer = get_writer(fmt)
        assert writer.extension == fmt
        stream = io.StringIO()
        writer.write(transcript, stream)
        assert stream.getvalue() == writer.render(transcript)
    with pytest.raises(UsageError, match="unknown output format 'docx'"):
        get_writer("docx")
    with pytest.raises(UsageError):
        get_writer("all")
    assert expand_formats(["all"]) == ["txt", "srt", "vtt", "tsv", "json"] == list(ALL_FORMATS)
    assert expand_formats(["json", "all", "jsonl", "srt"]) == [
        "json", "txt", "srt", "vtt", "tsv", "jsonl",
    ]  # fmt: skip


def test_output_path():
    assert output_path("out", "in/talk.final.wav", "srt") == Path("out/talk.final.srt")
    assert output_path(Path("out"), "in/talk.wav", "json", unique_key="in_talk") == Path(
        "out/in_talk.json"
    )


def _stems(root, *names):
    return output_stems([root / name for name in names])


def test_output_stems_plain_when_no_collision(tmp_path):
    stems = _stems(tmp_path, "a/talk.wav", "b/intro.mp3", "c.flac")
    assert list(stems.values()) == ["talk", "intro", "c"]


def test_output_stems_prefix_parent_on_collision(tmp_path):
    stems = _stems(tmp_path, "a/talk.wav", "b/talk.wav", "intro.wav")
    assert list(stems.values()) == ["a_talk", "b_talk", "intro"]


def test_output_stems_as_many_parents_as_needed(tmp_path):
    stems = _stems(tmp_path, "x/a/talk.wav", "y/a/talk.wav", "z/b/talk.wav")
    assert list(stems.values()) == ["x_a_talk", "y_a_talk", "b_talk"]


def test_output_stems_same_folder_other_extension(tmp_path):
    stems = _stems(tmp_path, "d/talk.wav", "d/talk.mp3", "e/talk.wav")
    assert list(stems.values()) == ["talk_wav", "talk_mp3", "talk"]


def test_output_stems_case_insensitive(tmp_path):
    stems = _stems(tmp_path, "a/Talk.wav", "b/talk.wav")
    assert list(stems.values()) == ["a_Talk", "b_talk"]


def test_output_stems_prefixed_name_meets_plain_stem(tmp_path):
    names = ("a/talk.wav", "b/talk.wav", "c/a_talk.wav")
    stems = _stems(tmp_path, *names)
    assert len({s.casefold() for s in stems.values()}) == 3
    assert stems == _stems(tmp_path, *reversed(names))  # order does not matter


def test_output_stems_numbered_as_last_resort(tmp_path):
    names = ("r/a/b_c.wav", "q/b_c.wav", "r/a_b/c.wav", "s/c.wav", "r/a/b_c.wav")
    stems = _stems(tmp_path, *names)
    assert len(stems) == 4  # the repeated input is one key
    assert len({s.casefold() for s in stems.values()}) == 4
    assert sum(s.endswith("_2") for s in stems.values()) == 1
    assert stems == _stems(tmp_path, *reversed(names))


def test_output_stems_same_file_spelled_twice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stems = output_stems([Path("talk.wav"), tmp_path / "talk.wav"])
    assert list(stems.values()) == ["talk", "talk"]


# --- atomic writes -----------------------------------------------------------------------------


def test_write_atomic_writes_utf8_exactly(tmp_path):
    target = tmp_path / "out.srt"
    write_atomic(target, "héllo\nworld\n")
    assert target.read_bytes() == "héllo\nworld\n".encode("utf-8")
    assert os.listdir(tmp_path) == ["out.srt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600
    write_atomic(tmp_path / "program", b"\x00\xff\r\n")  # bytes as they are (programs.py's stored programs)
    assert (tmp_path / "program").read_bytes() == b"\x00\xff\r\n"


def test_write_atomic_replaces_existing_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old, longer content\n")
    inode_before = target.stat().st_ino
    write_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    assert target.stat().st_ino != inode_before  # swapped in, not rewritten in place
    assert os.listdir(tmp_path) == ["out.txt"]


@pytest.mark.parametrize("existing", [None, "old\n"])
def test_write_atomic_failure_leaves_nothing(tmp_path, monkeypatch, existing):
    target = tmp_path / "out.txt"
    if existing is not None:
        target.write_text(existing)

    def failing_fsync(fd):
        assert os.path.getsize(next(tmp_path.glob(".out.txt.*.tmp"))) > 0  # data half-way there
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writers.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, "x" * 100_000)
    assert sorted(os.listdir(tmp_path)) == ([] if existing is None else ["out.txt"])
    if existing is not None:
        assert target.read_text() == existing


def test_write_atomic_unencodable_text_leaves_nothing(tmp_path):
    with pytest.raises(UnicodeEncodeError):
        write_atomic(tmp_path / "out.txt", "ok" * 10_000 + "\ud800")
    assert os.listdir(tmp_path) == []


def test_write_atomic_failed_replace_removes_temp(tmp_path, monkeypatch):
    def failing_replace(src, dst):
        raise PermissionError("busy")

    monkeypatch.setattr(writers.os, "replace", failing_replace)
    with pytest.raises(PermissionError):
        write_atomic(tmp_path / "out.txt", "text")
    assert os.listdir(tmp_path) == []


def test_write_transcript_all_formats(transcript, tmp_path):
    out_dir = tmp_path / "new" / "dir"
    paths = write_transcript(transcript, out_dir, "a_talk", ["all"])
    assert paths == [out_dir / f"a_talk.{ext}" for ext in ALL_FORMATS]
    for path, fmt in zip(paths, ALL_FORMATS):
        assert path.read_bytes() == get_writer(fmt).render(transcript).encode("utf-8")
    assert sorted(os.listdir(out_dir)) == sorted(p.name for p in paths)


def test_write_transcript_all_or_nothing(transcript, tmp_path, monkeypatch):
    existing = tmp_path / "talk.srt"
    existing.write_text("old\n")
    real_write_temp = writers._write_temp
    calls = []

    def write_temp_failing_third(path, text, made):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_write_temp(path, text, made)

    monkeypatch.setattr(writers, "_write_temp", write_temp_failing_third)
    with pytest.raises(OSError):
        write_transcript(transcript, tmp_path, "talk", ["txt", "srt", "vtt", "json"])
    assert len(calls) == 3
    assert os.listdir(tmp_path) == ["talk.srt"] and existing.read_text() == "old\n"


def test_write_transcript_unknown_format_writes_nothing(transcript, tmp_path):
    with pytest.raises(UsageError):
        write_transcript(transcript, tmp_path, "talk", ["txt", "docx"])
    assert os.listdir(tmp_path) == []
