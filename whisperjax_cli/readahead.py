"""Encoding the next batch of windows on a thread while this batch decodes (batched mode).

A batch's decode loop is mostly small products and memory-bound attention to the audio: on
2 cores it leaves a core idle much of the time, and the encoder (large bfloat16 products)
can use it. In batched mode without the previous text, every window is known before any is
decoded, so the windows of the next step can be predicted and encoded meanwhile: tiny.en, 8
windows, AMD Zen 4 with 2 cores, encode 1.47 s + decode 1.83 s one after the other, 2.93 s
side by side (medians of 10).

A prediction is checked, not trusted: each window is named by ``(stream, seek, size)``, and the
next step uses a read-ahead row only where its own window has that name. The rest is encoded
as before, so a wrong guess (a window decoded again, a new file joining the batch) costs time,
never a wrong result.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

import jax
import numpy as np

from whisperjax_cli.features import model_window

Array = jax.Array
Key = tuple  # (id(stream), seek, size): the stream itself is held while its key is pending


class ReadAhead:
    """One batch of encoder output made ahead on a worker thread.

    ``encode(mels [n, frames, n_mels]) -> [bucket, n_audio_ctx, state]`` is called with the
    same stacking as the step would use, so a batch predicted right is the step's own input.
    """

    def __init__(self, encode: Callable[[np.ndarray], Array]):
        self._encode = encode
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[tuple[list, list[Key], Future]] = None

    def start(self, streams: list, keys: list[Key], mels: list[np.ndarray], after: Optional[Array] = None) -> None:
        """Encodes ``mels`` (windows named ``keys``, of ``streams``) on the worker thread, once
        ``after`` (this step's encoder output) is ready: it then shares the cores with the
        decode only, not with the encode the decode waits for."""
        self.drop()
        if not mels:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wjx-encode-ahead")
        batch = np.stack(mels)

        def work():
            if after is not None:
                jax.block_until_ready(after)
            return jax.block_until_ready(self._encode(batch))

        self._pending = (streams, keys, self._pool.submit(work))

    def first(self, streams: list) -> list:
        """``streams`` with those whose window is being read ahead first, in its order: a
        stream decoded again (a window cut in halves, text that stopped early) waits a step
        rather than leaving a read-ahead window out of the next batch. Windows of batched mode
        without the previous text are independent, so the order changes no result."""
        if self._pending is None:
            return streams
        ahead = {k[0]: i for i, k in enumerate(self._pending[1])}
        return sorted(streams, key=lambda s: ahead.get(id(s), len(ahead)))

    def take(self, keys: list[Key]) -> tuple[Optional[Array], list[Optional[np.ndarray]]]:
        """What was read ahead for the windows named ``keys``: ``(output, [])`` when it is
        exactly their batch, else ``(None, rows)`` with the output row ``[1, ...]`` (host) of
        each window read ahead and None for the others. Never leaves the worker running."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None, [None] * len(keys)
        _, made, future = pending
        if made == keys:
            return future.result(), []
        where = {k: i for i, k in enumerate(made)}
        if not any(k in where for k in keys):
            _settle(future)
            return None, [None] * len(keys)
        out = np.asarray(future.result())
        return None, [out[where[k]][None] if k in where else None for k in keys]

    def drop(self) -> None:
        """Forgets a pending batch (waiting for it, so two encodes never share the cores)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            _settle(pending[2])


def _settle(future: Future) -> None:
    """Waits for ``future``; an error of a batch nobody uses is nobody's."""
    try:
        future.result()
    except Exception:  # noqa: BLE001 - the step encodes these windows again and meets it there
        pass


def next_windows(files: dict, current: list, batch_size: int) -> tuple[list, list[Key], list[np.ndarray]]:
    """``(streams, keys, mels)`` of the windows the next step decodes if every stream of this
    step (``current``) ends in it: the next unfinished streams of the open ``files`` in the
    scheduler's order. A file's first window that language detection encoded is left out."""
    skip = {id(s) for s in current}
    streams, keys, mels = [], [], []
    for f in files.values():
        for s in f.streams:
            if len(streams) == batch_size:
                return streams, keys, mels
            if s.done or id(s) in skip:
                continue
            size = f.window_size(s)
            if f.is_first_window(s, size):
                continue
            streams.append(s)
            keys.append((id(s), s.seek, size))
            mels.append(model_window(f.mel, s.seek, size))
    return streams, keys, mels
