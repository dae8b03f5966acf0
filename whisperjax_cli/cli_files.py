"""What ``wjx transcribe`` and ``wjx classify`` read and write: the inputs named on the command
line (files, folders searched for audio, ``-`` for stdin) with the output stem of each, and
:class:`Outputs`, which writes finished transcripts to files or prints them on stdout in input
order."""

from __future__ import annotations

import dataclasses
import io
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from whisperjax_cli.errors import UsageError

# Picked up from folders given as inputs (case-insensitive); named files are always tried.
AUDIO_EXTENSIONS = frozenset(
    ".wav .flac .mp3 .ogg .opus .m4a .mp4 .webm .aac .wma .aiff .aif .caf".split()
)


@dataclasses.dataclass
class Input:
    """One audio input: how it is named, where it is (None: stdin), its output stem."""

    label: str
    path: Optional[Path]
    stem: str = ""

    def loader(self) -> Callable:
        """A zero-argument callable decoding this input, so read errors stay with their file."""
        from whisperjax_cli.audio import load_audio

        if self.path is None:
            stdin = sys.stdin.buffer
            return lambda: load_audio(io.BytesIO(stdin.read()), name="<stdin>")
        path = str(self.path)
        return lambda: load_audio(path)


def collect_inputs(args: tuple[str, ...]) -> tuple[list[Input], list[str]]:
    """Expands folders (recursively, audio extensions only), checks paths exist, names outputs.

    Returns:
      The inputs, each path once, in command-line order, and one error line per argument
      that gave nothing to transcribe (a missing path, a folder without audio).
    """
    from whisperjax_cli.writers import output_stems

    inputs: list[Input] = []
    errors: list[str] = []
    seen: set[str] = set()
    for arg in args:
        if arg == "-":
            if any(i.path is None for i in inputs):
                raise UsageError(None, "'-' (stdin) can be given only once")
            inputs.append(Input("-", None))
            continue
        path = Path(arg)
        if path.is_dir():
            found = [p for p in sorted(path.rglob("*")) if p.suffix.lower() in AUDIO_EXTENSIONS and not p.is_dir()]
            if not found:
                errors.append(f"{arg}: no audio files in this folder")
        elif os.path.lexists(path):
            found = [path]
        else:
            errors.append(f"{arg}: no such file")
            found = []
        for p in found:
            key = os.path.abspath(p)
            if key not in seen:
                seen.add(key)
                inputs.append(Input(str(p), p))
    stems = output_stems([i.path for i in inputs if i.path is not None])
    taken = {s.casefold() for s in stems.values()}
    for i in inputs:
        if i.path is not None:
            i.stem = stems[i.path]
        else:
            i.stem, n = "stdin", 2
            while i.stem.casefold() in taken:
                i.stem, n = f"stdin_{n}", n + 1
    return inputs, errors


class Outputs:
    """Where results go: files under a folder, or stdout (input order; jsonl as decoded)."""

    def __init__(self, inputs: list[Input], formats: list[str], output_dir: Optional[Path], reporter,
                 subtitles: Optional[Any] = None):
        self.inputs, self.formats, self.output_dir, self.reporter = inputs, formats, output_dir, reporter
        self.subtitles = subtitles  # writers.SubtitleOptions for srt/vtt, or None
        self.stdout = sys.stdout
        self.streaming = output_dir is None and formats == ["jsonl"]
        self.ready: dict[int, Optional[str]] = {}  # stdout text per finished input (None: failed)
        self.next = 0  # the next input to print on stdout

    def segments(self, index: int, segments) -> None:
        if self.streaming:
            from whisperjax_cli.writers import format_segment_jsonl

            for s in segments:
                self.stdout.write(format_segment_jsonl(s, file=self.inputs[index].label) + "\n")
            self.stdout.flush()

    def complete(self, index: int, transcript) -> bool:
        """Writes a finished transcript; False (and an error line) when that fails."""
        from whisperjax_cli.writers import get_writer, write_transcript

        if self.output_dir is not None:
            try:
                write_transcript(transcript, self.output_dir, self.inputs[index].stem, self.formats, self.subtitles)
            except OSError as err:
                self.reporter.error(f"{_output_named(err, self.output_dir)}: cannot write: {err.strerror or err}")
                return False
        elif not self.streaming:
            self.ready[index] = get_writer(self.formats[0]).render(transcript, self.subtitles)
            self._drain()
        return True

    def failed(self, index: int) -> None:
        self.ready[index] = None
        self._drain()

    def _drain(self) -> None:
        """Prints, in input order, every stdout result whose predecessors are all done."""
        while self.next in self.ready:
            text = self.ready.pop(self.next)
            if text is not None:
                self.stdout.write(text)
                self.stdout.flush()
            self.next += 1


def _output_named(err: OSError, output_dir: Path) -> Path:
    """The output an OSError is about: the file it names, or the output that a hidden
    temporary file (``.talk.srt.1a2b3c4d.tmp``) was to become, or else the folder."""
    import re

    if not err.filename:
        return output_dir
    path = Path(err.filename)
    temp = re.fullmatch(r"\.(.+)\.[0-9a-f]{8}\.tmp", path.name)
    return path.with_name(temp.group(1)) if temp else path


def existing_outputs(i: Input, output_dir: Path, formats: list[str]) -> bool:
    """True when every requested output of ``i`` is already in ``output_dir`` (--skip-existing)."""
    from whisperjax_cli.writers import get_writer

    return all((output_dir / f"{i.stem}.{get_writer(f).extension}").exists() for f in formats)
