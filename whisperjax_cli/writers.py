"""Output writers: txt, srt, vtt, tsv, json and JSON Lines, and safe output files.

The shapes follow openai-whisper's ``utils.py`` writers, with these documented choices:

- Times are cleaned before they are written: a missing, non-finite or negative start becomes 0,
  a missing or non-finite end becomes the start, and an end before its start is raised to the
  start. No writer emits a ``None``, ``NaN`` or negative time.
- Milliseconds are ``round(seconds * 1000)`` everywhere (srt, vtt, tsv), as in openai-whisper,
  so Python's round-half-to-even applies to exact ties.
- srt: ``HH:MM:SS,mmm`` with hours always shown; cues numbered from 1.
- vtt: ``HH:MM:SS.mmm`` with hours **always** shown (openai shows them only past one hour;
  WebVTT allows both, and fixed-width times are easier to read and to diff). No cue ids.
- Subtitle text is stripped, ``-->`` becomes ``->`` (it would start a timing line), line breaks
  are kept but blank lines inside a cue are dropped (a blank line ends a cue), and cues whose text
  is empty are left out, so cue numbers stay consecutive.
- txt and tsv write one line per segment: line breaks inside a text become spaces (tsv: tabs too).
- json is ``Transcript.to_dict()`` as UTF-8 (``ensure_ascii=False``, no BOM) with non-finite
  floats written as ``null`` and times cleaned as above.
- jsonl is one JSON object per segment per line, for streaming results as they are decoded.
- Segments with word timings carry ``words: [{word, start, end, probability}]`` in json and
  jsonl (openai-whisper's shape). srt and vtt use them when :class:`SubtitleOptions` asks for
  word-level cues (openai-whisper's ``--highlight_words``, ``--max_line_width``,
  ``--max_line_count``, ``--max_words_per_line``); cues then never overlap the next one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
from pathlib import Path
import re
from typing import Callable, Iterable, Optional

from whisperjax_cli.errors import UsageError
from whisperjax_cli.interrupts import uninterrupted
from whisperjax_cli.results import Segment, Transcript, Word

FORMATS = ("txt", "srt", "vtt", "tsv", "json", "jsonl")
# What ``-f all`` means: openai-whisper's set. jsonl is for streaming, so it is asked for by name.
ALL_FORMATS = ("txt", "srt", "vtt", "tsv", "json")


# --- times -------------------------------------------------------------------------------------


def _is_finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(value)


def clean_times(start: Optional[float], end: Optional[float]) -> tuple[float, float]:
    """Returns ``(start, end)`` with ``0 <= start <= end``, both finite.

    Decoding can yield a slightly negative start (a timestamp before the window) or an end
    before its start; subtitle players reject both, and ``None`` has no subtitle spelling.
    """
    start = float(start) if _is_finite(start) and start > 0 else 0.0
    end = float(end) if _is_finite(end) else start
    return start, max(start, end)


def _to_ms(seconds: float) -> int:
    # openai-whisper's rounding, so wjx and whisper subtitles agree to the millisecond.
    return round(seconds * 1000.0)


def format_timestamp(
    seconds: float, *, always_include_hours: bool = True, decimal_marker: str = ","
) -> str:
    """Formats seconds as ``HH:MM:SS,mmm`` (or ``MM:SS,mmm`` below one hour without hours).

    Args:
        seconds: A finite, non-negative time; writers pass times through `clean_times` first.
        always_include_hours: Show ``HH:`` even below one hour.
        decimal_marker: ``","`` for srt, ``"."`` for vtt.

    Returns:
        The timestamp string; hours grow past two digits after 99 hours.

    Raises:
        ValueError: ``seconds`` is negative, infinite or NaN.
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"timestamp must be finite and non-negative, got {seconds!r}")
    milliseconds = _to_ms(seconds)
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    secs, milliseconds = divmod(milliseconds, 1000)
    hours_part = f"{hours:02d}:" if always_include_hours or hours > 0 else ""
    return f"{hours_part}{minutes:02d}:{secs:02d}{decimal_marker}{milliseconds:03d}"


# --- text --------------------------------------------------------------------------------------


def _cue_text(text: str) -> str:
    """Subtitle text: stripped, no ``-->``, line breaks kept, no blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # A loop, not one replace: "--->" becomes "-->" after a single pass.
    while "-->" in text:
        text = text.replace("-->", "->")
    lines = (line.strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


# --- word-level subtitles ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SubtitleOptions:
    """How srt and vtt cues are cut from word timings: openai-whisper's subtitle options.

    Attributes:
        highlight_words: Underline (``<u>``) each word of a cue while it is spoken: one cue per
            word, and cues with the plain text for the gaps between words.
        max_line_width: Characters per line; lines break between words, and a word longer than
            this stands alone on its line. Without ``max_line_count`` a cue is one segment.
        max_line_count: Lines per cue (with ``max_line_width``); cues then run across segments and
            also break at a pause of more than 3 s.
        max_words_per_line: Words per cue, when ``max_line_width`` is not given.
    """

    highlight_words: bool = False
    max_line_width: Optional[int] = None
    max_line_count: Optional[int] = None
    max_words_per_line: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.highlight_words, bool):
            raise UsageError("--highlight-words", f"must be true or false, not {self.highlight_words!r}")
        for name in ("max_line_width", "max_line_count", "max_words_per_line"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"--{name.replace('_', '-')}", f"must be a whole number >= 1, not {value!r}")

    @property
    def uses_words(self) -> bool:
        """Whether cues come from word timings (any option set; openai-whisper's cues from words)."""
        return self.highlight_words or any(
            v is not None for v in (self.max_line_width, self.max_line_count, self.max_words_per_line))


LONG_PAUSE = 3.0  # seconds between word starts that end a cue running across segments (openai-whisper)


def _subtitle_words(segments: list[Segment], options: SubtitleOptions) -> Iterable[list[Word]]:
    """openai-whisper's ``iterate_subtitles``: groups words into cues. A word that begins a line
    has its text stripped, and prefixed with a line break unless it begins the cue."""
    preserve_segments = options.max_line_count is None or options.max_line_width is None
    width = options.max_line_width or math.inf
    # openai-whisper documents max_words_per_line as having no effect with max_line_width
    per_chunk = options.max_words_per_line if options.max_line_width is None else None
    line_len, line_count, cue = 0, 1, []
    last = next((w.start for s in segments for w in s.words or []), 0.0)
    for segment in segments:
        words = segment.words or []
        chunk = per_chunk or max(1, len(words))
        for first in range(0, len(words), chunk):
            for i, original in enumerate(words[first : first + chunk]):
                word = dataclasses.replace(original)
                long_pause = not preserve_segments and word.start - last > LONG_PAUSE
                has_room = line_len + len(word.word) <= width
                new_segment = i == 0 and bool(cue) and preserve_segments
                if line_len > 0 and has_room and not long_pause and not new_segment:
                    line_len += len(word.word)
                else:
                    word.word = word.word.strip()
                    full = options.max_line_count is not None and line_count >= options.max_line_count
                    if cue and ((long_pause or full) and options.max_line_count is not None or new_segment):
                        yield cue
                        cue, line_count = [], 1
                    elif line_len > 0:
                        line_count += 1
                        word.word = "\n" + word.word
                    line_len = len(word.word.strip())
                cue.append(word)
                last = word.start
    if cue:
        yield cue


def _highlighted(cue: list[Word], index: int) -> str:
    return "".join(re.sub(r"^(\s*)(.*)$", r"\1<u>\2</u>", w.word) if j == index else w.word
                   for j, w in enumerate(cue))


def word_cues(segments: list[Segment], options: SubtitleOptions) -> list[tuple[float, float, str]]:
    """The ``(start, end, text)`` cues of word-timed ``segments`` under ``options``.

    Times are cleaned (`clean_times`), made non-decreasing, and each cue ends no later than the
    next one starts (word times of neighbouring segments can overlap by a few tens of ms), so
    players never show two cues at once.
    """
    cues = []
    for cue in _subtitle_words(segments, options):
        text = "".join(w.word for w in cue)
        start, end = clean_times(cue[0].start, cue[-1].end)
        if not options.highlight_words:
            cues.append((start, end, text))
            continue
        last = start
        for i, word in enumerate(cue):
            word_start, word_end = clean_times(word.start, word.end)
            if word_start > last:  # the gap before the word, with nothing underlined
                cues.append((last, word_start, text))
            cues.append((word_start, word_end, _highlighted(cue, i)))
            last = word_end
    out, floor = [], 0.0
    for i, (start, end, text) in enumerate(cues):
        start = max(start, floor)
        following = cues[i + 1][0] if i + 1 < len(cues) else math.inf
        end = max(start, min(end, following))
        out.append((start, end, text))
        floor = start
    return out


# --- renderers (Transcript -> str) -------------------------------------------------------------


def _render_txt(transcript: Transcript) -> str:
    return "".join(_one_line(s.text) + "\n" for s in transcript.segments)


def _cues(transcript: Transcript, decimal_marker: str,
          options: Optional["SubtitleOptions"] = None) -> Iterable[tuple[str, str, str]]:
    """Yields ``(start, end, text)`` for every cue with text left after cleaning: one per
    segment, or the word-level cues of ``options`` when it asks for them and there are words."""
    if options is not None and options.uses_words and any(s.words for s in transcript.segments):
        for start, end, text in word_cues(transcript.segments, options):
            text = _cue_text(text)
            if text:
                yield (format_timestamp(start, decimal_marker=decimal_marker),
                       format_timestamp(end, decimal_marker=decimal_marker), text)
        return
    for segment in transcript.segments:
        text = _cue_text(segment.text)
        if not text:
            continue
        start, end = clean_times(segment.start, segment.end)
        yield (
            format_timestamp(start, decimal_marker=decimal_marker),
            format_timestamp(end, decimal_marker=decimal_marker),
            text,
        )


def _render_srt(transcript: Transcript, options: Optional["SubtitleOptions"] = None) -> str:
    cues = _cues(transcript, ",", options)
    return "\n".join(
        f"{i}\n{start} --> {end}\n{text}\n" for i, (start, end, text) in enumerate(cues, start=1)
    )


def _render_vtt(transcript: Transcript, options: Optional["SubtitleOptions"] = None) -> str:
    cues = [f"{start} --> {end}\n{text}\n" for start, end, text in _cues(transcript, ".", options)]
    return "WEBVTT\n" + "".join("\n" + cue for cue in cues)


def _render_tsv(transcript: Transcript) -> str:
    rows = ["start\tend\ttext\n"]
    for segment in transcript.segments:
        start, end = clean_times(segment.start, segment.end)
        text = _one_line(segment.text.replace("\t", " "))
        rows.append(f"{_to_ms(start)}\t{_to_ms(end)}\t{text}\n")
    return "".join(rows)


def _json_safe(value):
    """Plain JSON values: arrays become lists, non-finite floats become ``None``."""
    if hasattr(value, "tolist"):  # numpy / jax scalars and arrays straight from decoding
        value = value.tolist()
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def segment_dict(segment: Segment) -> dict:
    """``segment.to_dict()`` made JSON-safe, with segment and word times cleaned."""
    out = _json_safe(segment.to_dict())
    out["start"], out["end"] = clean_times(segment.start, segment.end)
    for word_out, word in zip(out.get("words") or [], segment.words or []):
        word_out["start"], word_out["end"] = clean_times(word.start, word.end)
    return out


def _dumps(obj: dict) -> str:
    # allow_nan=False: a non-finite float that slipped past _json_safe fails loudly instead of
    # writing NaN, which is not JSON.
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


def _render_json(transcript: Transcript) -> str:
    out = _json_safe(transcript.to_dict())
    out["segments"] = [segment_dict(s) for s in transcript.segments]
    return _dumps(out) + "\n"


# ensure_ascii=False leaves these raw, and str.splitlines() (unlike JSON) treats them as line
# breaks; escaping them keeps every JSON Lines record on one line for every reader.
_LINE_BREAKS_JSON_KEEPS = {"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def format_segment_jsonl(segment: Segment, file: Optional[str] = None) -> str:
    """One segment as a single JSON Lines record, without the trailing newline.

    Args:
        segment: The decoded segment.
        file: The input it came from; added first as a ``"file"`` key when given.

    Returns:
        A one-line JSON object: the segment's JSON fields, plus ``"file"``.
    """
    record = segment_dict(segment)
    if file is not None:
        record = {"file": str(file), **record}
    line = _dumps(record)
    for raw, escaped in _LINE_BREAKS_JSON_KEEPS.items():
        line = line.replace(raw, escaped)
    return line


def _render_jsonl(transcript: Transcript) -> str:
    return "".join(format_segment_jsonl(s) + "\n" for s in transcript.segments)


@dataclasses.dataclass(frozen=True)
class Writer:
    """One output format: its file extension and how a transcript is rendered."""

    extension: str
    renderer: Callable[..., str]
    subtitles: bool = False  # the renderer takes SubtitleOptions (srt, vtt)

    def render(self, transcript: Transcript, options: Optional[SubtitleOptions] = None) -> str:
        """The transcript in this format; ``options`` shape srt and vtt cues (others ignore it)."""
        return self.renderer(transcript, options) if self.subtitles else self.renderer(transcript)

    def write(self, transcript: Transcript, stream, options: Optional[SubtitleOptions] = None) -> None:
        """Writes the rendered transcript to a text stream (a file, ``sys.stdout``)."""
        stream.write(self.render(transcript, options))


_WRITERS = {
    "txt": Writer("txt", _render_txt),
    "srt": Writer("srt", _render_srt, subtitles=True),
    "vtt": Writer("vtt", _render_vtt, subtitles=True),
    "tsv": Writer("tsv", _render_tsv),
    "json": Writer("json", _render_json),
    "jsonl": Writer("jsonl", _render_jsonl),
}


def get_writer(fmt: str) -> Writer:
    """Returns the writer for one of `FORMATS`; raises `UsageError` for anything else."""
    try:
        return _WRITERS[fmt]
    except KeyError:
        choices = ", ".join((*FORMATS, "all"))
        raise UsageError(None, f"unknown output format {fmt!r} (choose from {choices})") from None


def expand_formats(formats: Iterable[str]) -> list[str]:
    """Expands ``"all"`` to `ALL_FORMATS` and drops repeats, keeping the first order seen."""
    out: list[str] = []
    for fmt in formats:
        for one in ALL_FORMATS if fmt == "all" else (fmt,):
            get_writer(one)  # fail on an unknown name before anything is written
            if one not in out:
                out.append(one)
    return out


# --- output paths ------------------------------------------------------------------------------


def output_path(
    output_dir: Path | str, input_path: Path | str, fmt: str, *, unique_key: Optional[str] = None
) -> Path:
    """Returns ``<output_dir>/<stem>.<ext>``.

    Args:
        output_dir: Folder for the outputs.
        input_path: The input audio file.
        fmt: One of `FORMATS`.
        unique_key: The stem to use instead of the input's own, normally from `output_stems`.
    """
    stem = unique_key if unique_key is not None else Path(input_path).stem
    return Path(output_dir) / f"{stem}.{get_writer(fmt).extension}"


def _stem_candidates(path: Path, with_extension: bool) -> list[str]:
    """Names for one input, each more specific: ``stem``, ``parent_stem``, ``grand_parent_stem``."""
    stem = path.stem
    if with_extension and path.suffix:
        stem = f"{stem}_{path.suffix.lstrip('.')}"
    parents = path.parent.parts[1:]  # the absolute path's anchor ("/") names nothing
    prefixed = ["_".join((*parents[len(parents) - k :], stem)) for k in range(1, len(parents) + 1)]
    return [stem, *prefixed]


def _clashing(names: dict[Path, str]) -> set[Path]:
    # casefold: on macOS and Windows "Talk.srt" and "talk.srt" are the same file.
    seen: dict[str, list[Path]] = {}
    for path, name in names.items():
        seen.setdefault(name.casefold(), []).append(path)
    return {path for group in seen.values() if len(group) > 1 for path in group}


def output_stems(inputs: list[Path]) -> dict[Path, str]:
    """Gives every input an output stem that no other input shares.

    Inputs keep their plain stem unless it clashes (case-insensitively) with another input's.
    Clashing inputs are prefixed with as many parent folder names as it takes
    (``a/talk.wav``, ``b/talk.wav`` -> ``a_talk``, ``b_talk``); inputs in the same folder that
    differ only by extension get it appended (``talk_wav``, ``talk_mp3``). The result depends
    on the set of inputs only, not on their order. Paths naming the same absolute file share
    one stem.
    """
    absolute = {Path(p): Path(os.path.abspath(p)) for p in inputs}
    unique = sorted(set(absolute.values()))
    # Same folder and stem: only the extension can tell them apart.
    by_folder_stem: dict[tuple[str, str], int] = {}
    for path in unique:
        key = (str(path.parent).casefold(), path.stem.casefold())
        by_folder_stem[key] = by_folder_stem.get(key, 0) + 1
    ladders = {
        p: _stem_candidates(p, by_folder_stem[(str(p.parent).casefold(), p.stem.casefold())] > 1)
        for p in unique
    }
    level = dict.fromkeys(unique, 0)
    names = {p: ladders[p][0] for p in unique}
    while clashes := _clashing(names):
        movable = [p for p in clashes if level[p] + 1 < len(ladders[p])]
        if not movable:
            break
        for p in movable:
            level[p] += 1
            names[p] = ladders[p][level[p]]
    # Last resort (e.g. "a/b_c.wav" vs "a_b/c.wav"): in each group that still clashes, the
    # first path in sorted order keeps the name and the others are numbered from 2.
    taken = {name.casefold() for name in names.values()}
    groups: dict[str, list[Path]] = {}
    for p in sorted(_clashing(names)):
        groups.setdefault(names[p].casefold(), []).append(p)
    for group in groups.values():
        for p in group[1:]:
            n = 2
            while f"{names[p]}_{n}".casefold() in taken:
                n += 1
            names[p] = f"{names[p]}_{n}"
            taken.add(names[p].casefold())
    return {p: names[a] for p, a in absolute.items()}


# --- atomic files ------------------------------------------------------------------------------


def _write_temp(path: Path, text: str | bytes, made: list[Path]) -> Path:
    """Writes ``text`` (as UTF-8, or bytes as they are) to a new hidden file beside ``path``
    and returns its path.

    The file is appended to ``made`` the moment it exists (SIGTERM/SIGHUP cannot come in
    between), so that the caller's cleanup finds it whatever interrupts the writing.
    """
    while True:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            with uninterrupted():
                # os.open with 0o666 lets the umask decide permissions, as a plain open() would
                # (mkstemp would leave every output readable by its owner only).
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                made.append(temp)
            break
        except FileExistsError:
            continue
    binary = not isinstance(text, str)  # bytes or a bytearray
    with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())  # the data is on disk before the rename makes it visible
    return temp


def write_atomic(path: Path | str, text: str | bytes) -> None:
    """Writes ``text`` (a str as UTF-8, or bytes) to ``path`` so that readers see the old file
    or the new one, never half.

    The text goes to a temporary file in the same folder, then ``os.replace`` swaps it in.
    On any error (or SIGTERM) the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    made: list[Path] = []
    try:
        os.replace(_write_temp(path, text, made), path)
    except BaseException:
        for temp in made:
            temp.unlink(missing_ok=True)
        raise


def write_transcript(
    transcript: Transcript, output_dir: Path | str, stem: str, formats: Iterable[str],
    subtitle_options: Optional[SubtitleOptions] = None,
) -> list[Path]:
    """Writes one transcript in every requested format, all or nothing.

    Every format is rendered and written to a temporary file first; only when all of them
    succeeded are they renamed into place (same-folder renames, which do not fail for lack of
    space). A failure while rendering or writing (bad format, full disk) leaves no new or
    half-written file behind and existing outputs untouched.

    Args:
        transcript: The result to write.
        output_dir: Folder for the outputs; created if missing.
        stem: The file name without extension, normally from `output_stems`.
        formats: Names from `FORMATS`, or ``"all"``.
        subtitle_options: How srt and vtt cues are cut from word timings (`SubtitleOptions`).

    Returns:
        The written paths, in the order of ``formats``.
    """
    fmts = expand_formats(formats)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    texts: list[tuple[Path, str]] = []
    for fmt in fmts:
        writer = get_writer(fmt)
        texts.append((output_dir / f"{stem}.{writer.extension}", writer.render(transcript, subtitle_options)))
    made: list[Path] = []  # every temporary file created, even one a signal cut off mid-write
    try:
        temps = [(_write_temp(path, text, made), path) for path, text in texts]
        for temp, path in temps:
            os.replace(temp, path)
    except BaseException:
        for temp in made:
            temp.unlink(missing_ok=True)
        raise
    return [path for path, _ in texts]
