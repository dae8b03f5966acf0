"""Where a run's wall time goes: named phases timed by whoever asks for them.

A :class:`Timings` object is passed down (``Transcriber(timings=...)``, for benchmarks); nothing
is timed, and nothing global is touched, without one. Phases nest
freely; each is the wall time spent inside it, so a parent phase includes its children.
Device work is asynchronous: the phases that end with a transfer to the host (``decode``) or
wait on their result (``encode``) carry the device time.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Iterator, Optional

# The phases of a long-form run, in pipeline order (a table lists them so, then any others).
PHASES = ("imports", "model load", "compile", "audio decode", "language", "mel", "encoder", "decode",
          "fallback decode", "host", "writing")


class Timings:
    """Seconds and counts per phase name; safe to share between threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, seconds: float, count: int = 1) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            self.counts[name] = self.counts.get(name, 0) + count

    @contextlib.contextmanager
    def measure(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def to_dict(self) -> dict:
        with self._lock:
            return {name: {"seconds": round(self.seconds[name], 4), "count": self.counts[name]}
                    for name in _ordered(self.seconds)}

    def table(self, total: Optional[float] = None) -> str:
        """Phase, seconds, share of ``total`` (when given) and count, one line each."""
        rows = [f"{'phase':<16} {'seconds':>9} {'share':>6} {'count':>6}"]
        for name, entry in self.to_dict().items():
            share = f"{100 * entry['seconds'] / total:5.1f}%" if total else "     -"
            rows.append(f"{name:<16} {entry['seconds']:9.3f} {share:>6} {entry['count']:6d}")
        return "\n".join(rows)

    def write(self, path: str, **extra) -> None:
        with open(path, "w", encoding="utf-8") as out:
            json.dump({"phases": self.to_dict(), **extra}, out, indent=2)


def _ordered(names) -> list[str]:
    known = [p for p in PHASES if p in names]
    return known + sorted(n for n in names if n not in PHASES)


def maybe(timings: Optional[Timings], name: str):
    """``timings.measure(name)``, or a context that does nothing when ``timings`` is None."""
    return contextlib.nullcontext() if timings is None else timings.measure(name)
