"""Batched mode's segments read across a break of the packed audio, cut there by their words.

:func:`~whisperjax_cli.packing.vad_windows` lays speech spans end to end whatever the file left
out between them: windows of one passage each lost context. The model then now and then reads
the speech on both sides of a *break* (``BREAK_MIN`` or more of the file left out) as one
segment, which mapped back to the file is shown all through the audio left out (tiny.en wrote
" Go forward 10 meters 33 4 692" from 20.1 s to 65.8 s over 40 s of silence,
tests/test_batched.py). A short edge piece across a seam is already left out by
:meth:`~whisperjax_cli.packing.Timeline.segment_to_source`; a segment with long pieces on both
sides of a break is cut at it here: the cross-attention alignment
(:func:`~whisperjax_cli.alignment.align_tokens`) times its words, and the words on each side make a
segment of their own. Only windows with such a segment pay for the alignment (with word
timestamps, every window has one already).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from whisperjax_cli.features import FRAMES_PER_SECOND
from whisperjax_cli.packing import SEAM_SLACK, Timeline
from whisperjax_cli.results import Segment
from whisperjax_cli.tokenizer import TIME_PRECISION
from whisperjax_cli.timing import APPEND_PUNCTUATIONS, PREPEND_PUNCTUATIONS, merge_punctuations, word_timings


@dataclasses.dataclass
class Piece:
    """A segment of a window that :func:`cut_window` went over, and the packed seconds
    ``[low, high]`` between the breaks around it, where its speech is."""

    segment: Segment
    low: float = -math.inf
    high: float = math.inf

    def keep_inside(self) -> None:
        """Moves the segment's times and its words' inside ``[low, high]``. Word timing may
        start a segment's first word a little before a break, or end its last word a little
        after one: mapped to the file, such a word lasts all through the audio left out."""
        def inside(t: float) -> float:
            return min(max(t, self.low), self.high)

        self.segment.start, self.segment.end = inside(self.segment.start), inside(self.segment.end)
        for word in self.segment.words or []:
            word.start, word.end = inside(word.start), inside(word.end)


def sides(timeline: Timeline, breaks: np.ndarray, segment: Segment) -> tuple[int, int]:
    """The first and last side of ``breaks`` (packed frames; side ``k`` lies after ``k`` of
    them) that a segment's packed times reach as
    :meth:`~whisperjax_cli.packing.Timeline.segment_to_source` maps them: its short edge pieces
    left out, a start less than ``SEAM_SLACK`` before a break after it, an end as close after
    one before it."""
    s, e = timeline.trimmed(segment.start, segment.end)
    first = int(np.searchsorted(breaks, s + SEAM_SLACK, "right"))
    return first, max(first, int(np.searchsorted(breaks, e - SEAM_SLACK, "left")))


def crosses_break(timeline: Timeline, segments: list[Segment]) -> bool:
    """Whether a window's ``segments`` (packed seconds) hold one to cut (see the module)."""
    breaks = timeline.breaks
    return any(a < b for a, b in (sides(timeline, breaks, g) for g in segments))


def cut_window(tokenizer, timeline: Timeline, segments: list[Segment], offset: float, entry: np.ndarray,
               probs: np.ndarray, language: Optional[str] = None, prepend: str = PREPEND_PUNCTUATIONS,
               append: str = APPEND_PUNCTUATIONS) -> list[Piece]:
    """A decoded window's segments, each read across a break cut there.

    Args:
      tokenizer: the model's tokenizer.
      timeline: the packed audio's :class:`~whisperjax_cli.packing.Timeline`.
      segments: the window's segments in order, times in packed seconds (not mapped to the file).
      offset: packed seconds at the window's first frame.
      entry, probs: :func:`~whisperjax_cli.alignment.align_tokens`'s alignment of the text tokens of
        all ``segments`` in order.
      language: the window's language (words of unspaced languages are characters).
      prepend, append: punctuation joined to the word after or before it, so that a cut never
        leaves a mark alone on the far side.
    Returns:
      A :class:`Piece` per segment not cut (the segment itself), and per side of the breaks
      that holds words of a segment cut: a word is on the side of its middle.
    """
    breaks = timeline.breaks
    pieces, first = [], 0
    for segment in segments:
        text = [t for t in segment.tokens if t < tokenizer.eot]
        lo, hi = sides(timeline, breaks, segment)
        if lo == hi or not text:
            pieces.append(Piece(segment, *_bounds(breaks, lo)))
            first += len(text)
            continue
        words = word_timings(tokenizer, text, entry[first : first + len(text) + 1], probs[first : first + len(text)],
                             language)
        merge_punctuations(words, prepend, append)
        parts: list[tuple[int, list[int]]] = []  # (side, tokens), in order
        for w in words:
            middle = (offset + (w.start + w.end) / 2) * FRAMES_PER_SECOND
            side = int(np.clip(np.searchsorted(breaks, middle, "right"), lo, hi))
            if parts and parts[-1][0] == side:
                parts[-1][1].extend(w.tokens)
            elif w.tokens:  # punctuation merged away leaves an entry without tokens
                parts.append((side, list(w.tokens)))
        pieces += [_piece(tokenizer, segment, tokens, offset, *_bounds(breaks, side)) for side, tokens in parts]
        first += len(text)
    return pieces


def _bounds(breaks: np.ndarray, side: int) -> tuple[float, float]:
    """Packed seconds from the break before ``side`` to the one after it."""
    low = breaks[side - 1] / FRAMES_PER_SECOND if side > 0 else -math.inf
    high = breaks[side] / FRAMES_PER_SECOND if side < len(breaks) else math.inf
    return float(low), float(high)


def _piece(tokenizer, segment: Segment, text: list[int], offset: float, low: float, high: float) -> Piece:
    """The part of ``segment`` with the ``text`` tokens, between the breaks at ``low`` and
    ``high``; its tokens carry timestamps where the segment's did."""
    start, end = max(segment.start, low), min(segment.end, high)

    def stamp(t: float) -> list[int]:
        return [tokenizer.timestamp_begin + round((t - offset) / TIME_PRECISION)]

    timed = [t >= tokenizer.timestamp_begin for t in (segment.tokens[0], segment.tokens[-1])]
    tokens = (stamp(start) if timed[0] else []) + text + (stamp(end) if timed[1] else [])
    cut = dataclasses.replace(segment, start=round(start, 3), end=round(end, 3), text=tokenizer.decode(text),
                              tokens=tokens, words=None)
    return Piece(cut, low, high)
