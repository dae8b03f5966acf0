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


class Throughput:
    """Audio seconds decoded per wall second, measured since the first progress report.

    The ETA of what is left is its audio divided by this rate: it counts down as work is done
    and stays right across files of any length (rich's own estimate, per bar, froze between
    30 s windows and put the overall ETA at one second with a minute to go).
    """

    def __init__(self, clock=None):
        import time

        self.clock = clock or time.monotonic
        self.start: Optional[float] = None
        self.done: dict[int, float] = {}

    def update(self, index: int, done: float) -> None:
        if self.start is None:
            self.start = self.clock()
        self.done[index] = done

    def rate(self) -> Optional[float]:
        """Audio seconds per second, or None before a measurable amount of work."""
        if self.start is None:
            return None
        elapsed = self.clock() - self.start
        total = sum(self.done.values())
        return total / elapsed if elapsed > 0.5 and total > 0 else None

    def eta(self, remaining_audio: float) -> Optional[float]:
        rate = self.rate()
        return None if rate is None else max(0.0, remaining_audio) / rate


def format_eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-:--:--"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Reporter:
    """Status output for one run over ``labels`` (one per input, in input order).

    Args:
      labels: how each input is named in messages.
      show_progress: draw rich progress bars (the caller decides: stderr is a TTY, not quiet).
      verbose: print each segment as it is decoded.
      stream: where to write; stderr by default.
    """

    def __init__(self, labels: Sequence[str], *, show_progress: bool = False, verbose: bool = False,
                 quiet: bool = False, stream: Optional[TextIO] = None):
        import time

        self.labels = list(labels)
        self.verbose = verbose
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self._bars = _Bars(self.labels, self.stream) if show_progress and self.labels else None
        self._started = time.monotonic()
        self.audio = 0.0  # seconds of audio in the inputs written
        self.written = 0  # inputs written

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

    def status(self, text: str):
        """A context manager showing ``text`` with a spinner while the body runs (model loading
        and compiling take seconds with nothing else to show); nothing without bars."""
        import contextlib

        if self._bars is None:
            return contextlib.nullcontext()
        return self._bars.status(text)

    def summary(self, where: str, failed: int, skipped: int = 0) -> None:
        """One line at the end: files written, failed, skipped, audio hours, wall time, RTFx
        (unless quiet)."""
        import time

        if self.quiet:
            return
        wall = time.monotonic() - self._started
        rtfx = f", {self.audio / wall:.1f}x real time" if wall > 0 and self.audio > 0 else ""
        parts = [f"{self.written} written to {where}"]
        if failed:
            parts.append(f"{failed} failed")
        if skipped:
            parts.append(f"{skipped} skipped")
        self._print(f"wjx: {', '.join(parts)}; {format_eta(self.audio)} of audio in {wall:.1f} s{rtfx}")

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

    def finished(self, index: int, ok: bool = True, seconds: float = 0.0) -> None:
        """Input ``index`` is done: written (``ok``, with ``seconds`` of audio), or failed."""
        if ok:
            self.written += 1
            self.audio += seconds
        if self._bars is not None:
            self._bars.finish(index)


class _Bars:
    """rich bars: one per file being decoded (in audio seconds, with ETA), one overall (files)."""

    def __init__(self, labels: list[str], stream: TextIO):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        self.console = Console(file=stream, force_terminal=True, highlight=False)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[amount]}"),
            TextColumn("{task.fields[eta]}"), console=self.console, transient=True,
            # Results go to stdout while the bars draw on stderr: never capture either stream.
            redirect_stdout=False, redirect_stderr=False,
        )
        self.labels = labels
        self.tasks: dict[int, int] = {}
        self.fraction: dict[int, float] = {}
        self.totals: dict[int, float] = {}  # audio seconds of each file seen
        self.done: dict[int, float] = {}
        self.throughput = Throughput()
        self.overall = self.progress.add_task(self._overall_text(), total=len(labels), amount="", eta="")

    def _overall_text(self) -> str:
        done = sum(1 for f in self.fraction.values() if f >= 1.0)
        return f"all files {done}/{len(self.labels)}"

    def start(self) -> None:
        self.progress.start()

    def stop(self) -> None:
        self.progress.stop()

    def status(self, text: str):
        return self.console.status(text)

    def print(self, line: str) -> None:
        from rich.text import Text

        self.console.print(Text(line))

    def update(self, index: int, done: float, total: float) -> None:
        if index not in self.tasks:
            self.tasks[index] = self.progress.add_task(_short(self.labels[index]), total=max(total, 1e-9),
                                                       amount="", eta="")
        self.totals[index], self.done[index] = total, min(done, total)
        self.throughput.update(index, self.done[index])
        eta = format_eta(self.throughput.eta(total - self.done[index]))
        self.progress.update(self.tasks[index], completed=done, amount=f"{done:.1f}/{total:.1f} s", eta=eta)
        self.fraction[index] = min(1.0, done / total) if total > 0 else 1.0
        self._refresh_overall()

    def finish(self, index: int) -> None:
        self.fraction[index] = 1.0
        if index in self.totals:
            self.done[index] = self.totals[index]
        task = self.tasks.pop(index, None)
        if task is not None:
            self.progress.remove_task(task)
        self._refresh_overall()

    def _refresh_overall(self) -> None:
        # Files not opened yet are counted at the mean length of those seen.
        seen = [t for i, t in self.totals.items()]
        unseen = len(self.labels) - len(self.totals)
        left = sum(self.totals[i] - self.done.get(i, 0.0) for i in self.totals)
        left += unseen * (sum(seen) / len(seen) if seen else 0.0)
        eta = format_eta(self.throughput.eta(left)) if seen else format_eta(None)
        self.progress.update(self.overall, completed=sum(self.fraction.values()), description=self._overall_text(),
                             eta=eta)


def _short(label: str, width: int = 32) -> str:
    return label if len(label) <= width else "…" + label[-(width - 1) :]
