"""The server's one decoding thread: every request's windows go through it (continuous batching).

JAX work stays on one thread, which owns one :class:`~whisperjax_cli.longform.Transcriber` feed
(:meth:`~whisperjax_cli.longform.Transcriber.run_feed`) per distinct
:class:`~whisperjax_cli.options.TranscribeOptions`: requests that decode alike (the common case,
a client sending many files with the defaults) share batches, and a new one joins its feed's next
decode step as soon as a row is free. Feeds with different options (a prompt, a language, a
temperature) cannot share a batch; the thread advances them in turn, one event each, so none
waits for another's files to end. A feed whose requests are all done ends, and is made again
when a request with its options comes.

A request's work is dropped when it is cancelled (the client went away) or its deadline passes:
before its audio is opened it leaves the queue; once open, :meth:`Transcriber.cancel` takes its rows
out of the feed's next step.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import threading
import time
from typing import Any, Callable, Optional

from whisperjax_cli.audio import load_audio
from whisperjax_cli.longform import Transcriber
from whisperjax_cli.options import TranscribeOptions
from whisperjax_cli.streams import FileEvent

LOG = logging.getLogger("wjx.serve")


class Dropped(Exception):
    """A request's work was dropped: cancelled, past its deadline, or the server stopped."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request's transcription, as the scheduler sees it.

    ``notify(kind, value)`` is called on the scheduler thread, so it must hand over to the
    caller's thread without blocking (e.g. ``loop.call_soon_threadsafe``): ``("segments",
    [Segment...])`` as windows decode, then ``("done", Transcript)`` or ``("error", exc)``.
    """

    options: TranscribeOptions
    path: str  # the upload, opened by the scheduler when a row is free
    deadline: float  # time.monotonic() after which the work is dropped
    notify: Callable[[str, Any], None]
    id: int = -1  # set by Scheduler.submit
    cancelled: bool = False  # set from any thread; the scheduler drops the work at its next turn


class _Feed:
    """One Transcriber and its ``run_feed`` generator, for the jobs sharing one options object."""

    def __init__(self, model, options: TranscribeOptions, route: Callable[[], None]):
        self.transcriber = Transcriber(model, options)
        self.inbox: collections.deque[Job] = collections.deque()  # routed here, not opened yet
        self.jobs: dict[int, Job] = {}  # every job of this feed not finished: queued or open
        self._route = route
        self.events = self.transcriber.run_feed(self._take)

    def _take(self, wait: bool) -> Optional[tuple[int, Callable[[], Any]]]:
        # Never blocks: with wait True, None ends this feed (made again for the next request).
        self._route()
        while self.inbox:
            job = self.inbox.popleft()
            if job.id in self.jobs:
                return job.id, functools.partial(_load, job)
        return None


def _load(job: Job):
    """The job's audio, read when a row is free (so only open files hold decoded audio)."""
    if job.cancelled or time.monotonic() > job.deadline:
        raise Dropped("dropped before decoding")
    return load_audio(job.path)


class Scheduler:
    """Owns all decoding: one thread, one feed per distinct options object, round-robin steps."""

    def __init__(self, model):
        self.model = model
        self._cond = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()  # submitted, not yet routed
        self._feeds: dict[TranscribeOptions, _Feed] = {}  # only the scheduler thread touches these
        self._ids = itertools.count()
        self._closing = False
        self._abort = False
        self._thread = threading.Thread(target=self._run, name="wjx-scheduler", daemon=True)
        self.steps = 0  # events drawn from feeds
        self.active = 0  # jobs routed to a feed and not finished
        self.peak_open = 0  # most requests one feed decoded side by side (shared batches)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queues ``job``; raises :class:`Dropped` once the scheduler is closing."""
        with self._cond:
            if self._closing:
                raise Dropped("the server is shutting down")
            job.id = next(self._ids)
            self._pending.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Drops ``job``'s work at the scheduler's next turn (safe from any thread)."""
        job.cancelled = True
        with self._cond:
            self._cond.notify()

    @property
    def queued(self) -> int:
        return len(self._pending)

    def close(self, timeout: float) -> bool:
        """Stops taking jobs, lets those submitted finish for up to ``timeout`` seconds, then
        drops the rest. Returns True when the thread ended (a decode step is not interrupted)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(max(0.0, timeout))
        if self._thread.is_alive():
            with self._cond:
                self._abort = True
                self._cond.notify()
            self._thread.join(30.0)
        return not self._thread.is_alive()

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            while self._wait_for_work():
                self._route()
                self._sweep()
                for options, feed in list(self._feeds.items()):
                    self._advance(options, feed)
        except Exception:  # noqa: BLE001 - a bug: fail every request rather than hang them
            LOG.exception("scheduler stopped")
        finally:
            self._fail_all(Dropped("the server stopped"))

    def _wait_for_work(self) -> bool:
        """Blocks while there is nothing to do; False when the thread should end."""
        with self._cond:
            while not (self._pending or self._feeds or self._closing or self._abort):
                self._cond.wait()
            if self._abort:
                return False
            return not (self._closing and not self._pending and not self._feeds)

    def _route(self) -> None:
        """Moves submitted jobs into their options' feed (made when first needed)."""
        while True:
            with self._cond:
                if not self._pending:
                    return
                job = self._pending.popleft()
            feed = self._feeds.get(job.options)
            if feed is None:
                try:  # the server checks options first; this keeps one bad job from stopping all
                    feed = _Feed(self.model, job.options, self._route)
                except Exception as err:  # noqa: BLE001 - reported to that request alone
                    _notify(job, "error", err)
                    continue
                self._feeds[job.options] = feed
            feed.inbox.append(job)
            feed.jobs[job.id] = job
            self.active += 1

    def _sweep(self) -> None:
        """Drops the work of cancelled and overdue jobs."""
        now = time.monotonic()
        for feed in self._feeds.values():
            for job in [j for j in feed.jobs.values() if j.cancelled or now > j.deadline]:
                self._finish(feed, job, "error", Dropped("deadline passed" if not job.cancelled else "cancelled"))
                feed.transcriber.cancel(job.id)  # its rows leave the batch; its last event is ignored

    def _advance(self, options: TranscribeOptions, feed: _Feed) -> None:
        """One event from ``feed`` (at most a few decode steps); ends the feed when it is idle."""
        if self._feeds.get(options) is not feed:  # replaced earlier in this round
            return
        try:
            event = next(feed.events)
        except StopIteration:
            del self._feeds[options]
            # Jobs routed here after its last take (while it handed out its final events) go
            # to a new feed; none can be open, since the run ends only once its files are done.
            waiting = [job for job in feed.inbox if job.id in feed.jobs]
            if waiting:
                fresh = self._feeds[options] = _Feed(self.model, options, self._route)
                fresh.inbox.extend(waiting)
                fresh.jobs.update((job.id, job) for job in waiting)
                for job in waiting:
                    del feed.jobs[job.id]
            self._fail_feed(feed, Dropped("the feed ended"))  # none left, unless a bug
            return
        except Exception as err:  # noqa: BLE001 - the feed is broken: fail its requests, keep serving
            LOG.exception("decoding failed")
            del self._feeds[options]
            self._fail_feed(feed, err)
            return
        self.steps += 1
        self.peak_open = max(self.peak_open, feed.transcriber.open_files)
        self._deliver(feed, event)

    def _deliver(self, feed: _Feed, event: FileEvent) -> None:
        job = feed.jobs.get(event.index)
        if job is None:  # dropped: its last event ends it
            return
        if event.error is not None:
            self._finish(feed, job, "error", event.error)
            return
        if event.segments:
            _notify(job, "segments", list(event.segments))
        if event.transcript is not None:
            self._finish(feed, job, "done", event.transcript)

    def _finish(self, feed: _Feed, job: Job, kind: str, value: Any) -> None:
        del feed.jobs[job.id]
        self.active -= 1
        _notify(job, kind, value)

    def _fail_feed(self, feed: _Feed, err: Exception) -> None:
        for job in list(feed.jobs.values()):
            self._finish(feed, job, "error", err)

    def _fail_all(self, err: Exception) -> None:
        for feed in self._feeds.values():
            self._fail_feed(feed, err)
        self._feeds.clear()
        with self._cond:
            self._closing = True
            pending, self._pending = list(self._pending), collections.deque()
        for job in pending:
            _notify(job, "error", err)


def _notify(job: Job, kind: str, value: Any) -> None:
    try:
        job.notify(kind, value)
    except RuntimeError:  # the request's event loop is closed: nobody is waiting any more
        pass
