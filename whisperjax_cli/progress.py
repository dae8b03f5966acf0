"""What ``wjx transcribe`` shows on stderr while it works: progress bars, segment lines, notes.

Progress is measured in audio seconds (per file, with an ETA) and in files (overall), and is
drawn with rich only when stderr is a terminal: logs and pipes get no bars. Nothing here ever
writes to stdout, which carries results only.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence, TextIO

from whisperjax_cli.writers import clean_times, format_timestamp


def segment_line(start: float, end: float, text: str) -> str:
    """openai-whisper's verbose line: ``[mm:ss.mmm --> mm:ss.mmm] text`` (``hh:`` from one hour)."""
    start, end = clean_times(start, end)

    def stamp(t: float) -> str:
        return format_timestamp(t, always_include_hours=False, decimal_marker=".")

    return f"[{stamp(start)} --> {stamp(end)}] {text.strip()}"


class Reporter:
    """Status output for one run over ``labels`` (one per input, in input order).

    Args:
      labels: how each input is named in messages.
      show_progress: draw rich progress bars (the caller decides: stderr is a TTY, not quiet).
      verbose: print each segment as it is decoded.
      stream: where to write; stderr by default.
    """

    def __init__(self, labels: Sequence[str], *, show_progress: bool = False, verbose: bool = False,
                 stream: Optional[TextIO] = None):
        self.labels = list(labels)
        self.verbose = verbose
        self.stream = stream if stream is not None else sys.stderr
        self._bars = _Bars(self.labels, self.stream) if show_progress and self.labels else None

    def __enter__(self) -> "Reporter":
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bars is not None:
            self._bars.stop()

    def _print(self, line: str) -> None:
        if self._bars is not None:
            self._bars.print(line)
        else:
            print(line, file=self.stream, flush=True)

    def error(self, message: str) -> None:
        """``wjx: <message>``, always shown."""
        self._print(f"wjx: {message}")

    def progress(self, index: int, done: float, total: float) -> None:
        """The transcriber's callback: ``done`` of ``total`` audio seconds of input ``index``."""
        if self._bars is not None:
            self._bars.update(index, done, total)

    def segments(self, index: int, segments) -> None:
        """Newly decoded segments of input ``index`` (printed only when verbose)."""
        if not self.verbose:
            return
        prefix = f"{self.labels[index]}: " if len(self.labels) > 1 else ""
        for s in segments:
            self._print(prefix + segment_line(s.start, s.end, s.text))

    def finished(self, index: int) -> None:
        """Input ``index`` is done (written, or failed)."""
        if self._bars is not None:
            self._bars.finish(index)


class _Bars:
    """rich bars: one per file being decoded (in audio seconds, with ETA), one overall (files)."""

    def __init__(self, labels: list[str], stream: TextIO):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(file=stream, force_terminal=True, highlight=False)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[amount]}"),
            TimeRemainingColumn(), console=self.console, transient=True,
            # Results go to stdout while the bars draw on stderr: never capture either stream.
            redirect_stdout=False, redirect_stderr=False,
        )
        self.labels = labels
        self.tasks: dict[int, int] = {}
        self.fraction: dict[int, float] = {}
        self.overall = self.progress.add_task(self._overall_text(), total=len(labels), amount="")

    def _overall_text(self) -> str:
        done = sum(1 for f in self.fraction.values() if f >= 1.0)
        return f"all files {done}/{len(self.labels)}"

    def start(self) -> None:
        self.progress.start()

    def stop(self) -> None:
        self.progress.stop()

    def print(self, line: str) -> None:
        from rich.text import Text

        self.console.print(Text(line))

    def update(self, index: int, done: float, total: float) -> None:
        if index not in self.tasks:
            self.tasks[index] = self.progress.add_task(_short(self.labels[index]), total=max(total, 1e-9),
                                                       amount="")
        self.progress.update(self.tasks[index], completed=done, amount=f"{done:.1f}/{total:.1f} s")
        self.fraction[index] = min(1.0, done / total) if total > 0 else 1.0
        self._refresh_overall()

    def finish(self, index: int) -> None:
        self.fraction[index] = 1.0
        task = self.tasks.pop(index, None)
        if task is not None:
            self.progress.remove_task(task)
        self._refresh_overall()

    def _refresh_overall(self) -> None:
        self.progress.update(self.overall, completed=sum(self.fraction.values()), description=self._overall_text())


def _short(label: str, width: int = 32) -> str:
    return label if len(label) <= width else "…" + label[-(width - 1) :]
