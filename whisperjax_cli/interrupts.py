"""SIGTERM and SIGHUP as an exception, and the short sections that one must not cut in two.

The CLI installs :func:`handle_termination`: from then on either signal raises :class:`Terminated`
in the main thread, so that a run unwinds through its ``finally`` blocks as for Ctrl-C. A signal
can land between any two bytecodes, though, for instance between creating a temporary file and
recording that it exists. Code that must not be split there runs under :func:`uninterrupted`: a
signal that arrives inside is remembered and raised as soon as the section ends.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so that the run unwinds as for Ctrl-C:
    temporary outputs are removed by the ``finally`` blocks that made them."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Signals received. Raising in the handler can land inside a C callback (libsndfile's reads call
# back into Python), which swallows the exception: check_terminated() raises it again at the
# command's own safe points, and so does the end of an uninterrupted() section.
_RECEIVED: list[int] = []
# Depth of uninterrupted() sections open in the main thread (the only thread Python runs signal
# handlers in, so the only one whose sections can be cut).
_held = 0


def _raise_terminated(signum, frame):
    _RECEIVED.append(signum)
    if not _held:
        raise Terminated(signum)


def check_terminated() -> None:
    """Raises :class:`Terminated` if SIGTERM/SIGHUP came and its exception was swallowed or held."""
    if _RECEIVED:
        raise Terminated(_RECEIVED[0])


def handle_termination() -> dict:
    """SIGTERM and SIGHUP raise :class:`Terminated`; returns the handlers they had."""
    _RECEIVED.clear()
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, _raise_terminated)
        except (ValueError, OSError):  # not the main thread (a library caller's): leave theirs
            pass
    return previous


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Holds SIGTERM/SIGHUP's :class:`Terminated` until the block ends, then raises it.

    Keep the block short (a few file operations): termination waits for it. Outside the main
    thread this does nothing, as signals are not raised there.
    """
    global _held
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = len(_RECEIVED)
    _held += 1
    try:
        yield
    finally:
        _held -= 1
    if not _held and len(_RECEIVED) > before:  # one came while held (not one of an earlier run)
        raise Terminated(_RECEIVED[before])


def forget_signals() -> None:
    """Drops the signals received: the command that they ended is over."""
    _RECEIVED.clear()
