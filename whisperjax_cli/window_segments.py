"""One decoded window's tokens as segments, and where its stream goes on (OpenAI's per-window
bookkeeping, with batched mode's packed windows): the host side of a window after its decode.
"""

from __future__ import annotations

import numpy as np

from whisperjax_cli.decoding import loop_start
from whisperjax_cli.features import FRAMES_PER_SECOND
from whisperjax_cli.results import Segment
from whisperjax_cli.streams import FileState, Stream
from whisperjax_cli.tokenizer import TIME_PRECISION

CONTINUE_MIN = 100  # frames: a packed window is decoded on from its last closed segment if 1 s of sound is left


def window_segments(tokenizer, f: FileState, s: Stream, size: int, result, split: bool = False, mapped: bool = True
                    ) -> tuple[list[Segment], int]:
    """Splits one window's tokens at timestamp pairs; returns (segments, frames to seek).

    A ``packed`` stream's window (batched mode) is decoded once: text after the last pair
    is a segment that ends with the window, and the stream moves on to its next window.
    A row that stopped in a loop keeps what it wrote before the repeats began; with
    ``split``, only its closed segments, and the stream moves to the last of their ends
    (the rest is decoded again, see ``Transcriber._split``). Times are the file's, or with
    ``mapped`` False those of the decoded (packed) audio.
    """
    seek = s.seek
    ts_begin = tokenizer.timestamp_begin
    tokens = np.asarray(result.tokens, np.int64)
    if s.packed and result.looped:
        tokens = tokens[: loop_start(tokens, ts_begin)]
    offset = seek / FRAMES_PER_SECOND
    is_ts = tokens >= ts_begin
    single_ending = len(tokens) >= 2 and not is_ts[-2] and is_ts[-1]
    consecutive = (np.flatnonzero(is_ts[:-1] & is_ts[1:]) + 1).tolist()
    segments = []
    if consecutive:
        slices = consecutive + ([len(tokens)] if single_ending else [])
        last = 0
        for cut in slices:
            part = tokens[last:cut]
            start = offset + (part[0] - ts_begin) * TIME_PRECISION
            end = offset + (part[-1] - ts_begin) * TIME_PRECISION
            segments.append(make_segment(tokenizer, f, seek, size, start, end, part, result, mapped))
            last = cut
        advance = size if single_ending else int(tokens[last - 1] - ts_begin) * 2
        if split:
            stamps = tokens[is_ts]
            return segments, min(int(stamps[-1] - ts_begin) * 2, size)
        if s.packed and not single_ending:
            rest = tokens[last:]
            if np.any(rest[1:] < tokenizer.eot):
                start = offset + (rest[0] - ts_begin) * TIME_PRECISION
                end = offset + size / FRAMES_PER_SECOND
                segments.append(make_segment(tokenizer, f, seek, size, start, end, rest, result, mapped))
                advance = size
            else:  # a loop's remainder is split (above) or given up, never decoded on
                advance = size if result.looped else packed_advance(f, s, size, advance)
    elif split:
        return [], 0
    else:
        duration = size / FRAMES_PER_SECOND
        stamps = tokens[is_ts]
        if len(stamps) and stamps[-1] != ts_begin:
            duration = (stamps[-1] - ts_begin) * TIME_PRECISION
        segments.append(make_segment(tokenizer, f, seek, size, offset, offset + duration, tokens, result, mapped))
        advance = size
    return segments, advance


def packed_advance(f: FileState, s: Stream, size: int, closed: int) -> int:
    """Where a packed window's stream goes on after the model closed its last segment at
    ``closed`` frames and stopped: past the window, unless at least ``CONTINUE_MIN`` of sound
    follows (the model dropped the window's last sentences), then from ``closed`` on, as
    OpenAI's loop seeks; a window that closed nothing in its first ``CONTINUE_MIN`` moves on."""
    if closed < CONTINUE_MIN or f.cuts is None:
        return size
    heard = f.cuts.sound_end(s.seek + closed, s.seek + size) - (s.seek + closed)
    return closed if heard >= CONTINUE_MIN else size


def make_segment(tokenizer, f: FileState, seek, size, start, end, tokens: np.ndarray, result, mapped: bool = True
                 ) -> Segment:
    """The segment of ``tokens`` between packed seconds ``start`` and ``end`` of the window at
    ``seek`` (``size`` frames), mapped to the file's times unless ``mapped`` is False."""
    # Past the window's content the model sees zero padding and may still place timestamps
    # there; clipping keeps every time inside the audio (and inside a packed window).
    limit = (seek + size) / FRAMES_PER_SECOND
    end = min(float(end), limit)
    start = min(float(start), end)
    text_tokens = [int(t) for t in tokens if t < tokenizer.eot]
    segment = Segment(
        id=0, seek=seek, start=start, end=end,
        text=tokenizer.decode(text_tokens), tokens=[int(t) for t in tokens],
        temperature=result.temperature, avg_logprob=result.avg_logprob,
        compression_ratio=result.compression_ratio, no_speech_prob=result.no_speech_prob,
    )
    if mapped:
        return to_file(f, segment)
    segment.start, segment.end = round(start, 3), round(end, 3)
    return segment


def to_file(f: FileState, segment: Segment) -> Segment:
    """``segment`` with its decoded times and seek mapped to the file's (in place)."""
    start, end = f.segment_to_source(segment.start, segment.end)
    segment.start, segment.end = round(min(start, end), 3), round(end, 3)
    if f.timeline is not None:
        segment.seek = round(f.to_source(segment.seek / FRAMES_PER_SECOND) * FRAMES_PER_SECOND)
    return segment
