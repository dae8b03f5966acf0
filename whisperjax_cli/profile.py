"""Where a run's wall time goes: named phases timed by whoever asks for them.

A :class:`Timings` object is passed down (``Transcriber(timings=...)``, ``wjx transcribe
--profile FILE``, the benchmarks); nothing is timed, and nothing global is touched, without one.
Each phase records its *own* time: a phase opened inside another (``vad`` inside ``audio
decode``) is taken out of the outer one, and so is the time JAX spends tracing, lowering and
compiling (or loading from the persistent cache) programs while a phase is open
(:func:`track_compiles`: ``trace``, ``lower``, ``compile``). The phases of one thread therefore
add up to its wall time, and a table of them accounts for a whole run.
Device work is asynchronous: the phases that end with a transfer to the host (``decode``) or
wait on their result (``encoder``) carry the device time.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Iterator, Optional

# The phases of a long-form run, in pipeline order (a table lists them so, then any others).
PHASES = ("interpreter", "imports", "model load", "trace", "lower", "compile", "audio decode", "vad", "language",
          "mel", "encoder", "decode", "fallback decode", "words", "host", "writing", "other")

# JAX's duration events (jax.monitoring) for the stages of making a program, and our names.
COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    # XLA's compile, or the program's retrieval from the persistent cache (a cache hit).
    "/jax/core/compile/backend_compile_duration": "compile",
    # Waiting for a program that another thread is reading back (whisperjax_cli.programs).
    "/wjx/programs/wait_duration": "compile",
}


class Timings:
    """Seconds and counts per phase name; safe to share between threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open = threading.local()  # per thread: a stack of [name, seconds taken by inner phases]
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, seconds: float, count: int = 1) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            self.counts[name] = self.counts.get(name, 0) + count

    def _stack(self) -> list:
        stack = getattr(self._open, "stack", None)
        if stack is None:
            stack = self._open.stack = []
        return stack

    @contextlib.contextmanager
    def measure(self, name: str) -> Iterator[None]:
        """Times the block as ``name``, less what inner phases and compiles took."""
        stack = self._stack()
        entry = [name, 0.0]
        stack.append(entry)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            stack.pop()
            if stack:
                stack[-1][1] += elapsed
            self.add(name, elapsed - entry[1])

    def carve(self, name: str, seconds: float) -> None:
        """Adds ``seconds`` measured elsewhere (a compile) to ``name`` and takes them out of the
        phase open on this thread, if any."""
        stack = self._stack()
        if stack:
            stack[-1][1] += seconds
        self.add(name, seconds)

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


@contextlib.contextmanager
def track_compiles(timings: Optional[Timings]) -> Iterator[None]:
    """While open, JAX's tracing, lowering and compiling on this thread go to ``timings``
    (``trace``, ``lower``, ``compile``), out of the phase open. A listener is registered with
    ``jax.monitoring`` for the duration (JAX has no other way to report them) and removed after.
    Other threads' compiles (programs read back ahead) are left out, so the phases still add up
    to this thread's wall time; the time spent waiting for them is reported as ``compile``."""
    if timings is None:
        yield
        return
    from jax import monitoring

    owner = threading.get_ident()

    def listener(event: str, seconds: float, **_) -> None:
        name = COMPILE_EVENTS.get(event)
        if name is not None and threading.get_ident() == owner:
            timings.carve(name, seconds)

    monitoring.register_event_duration_secs_listener(listener)
    try:
        yield
    finally:
        monitoring.unregister_event_duration_listener(listener)


def process_seconds() -> Optional[float]:
    """Seconds since this process started (Linux: ``/proc``), or None where that is unknown."""
    try:
        import os

        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_description() -> str:
    """The CPU model, cores this process may use, and whether it has AVX-512, AVX-512 BF16 and
    AMX (Linux ``/proc/cpuinfo``), for every printed figure: speed differs with them."""
    import os

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return "CPU: unknown (no /proc/cpuinfo)"
    from whisperjax_cli.runtime import cpu_flags

    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = cpu_flags()
    marks = " ".join(f"{name}={'yes' if name in flags else 'no'}"
                     for name in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU: {model}, {cores} cores; {marks}"
