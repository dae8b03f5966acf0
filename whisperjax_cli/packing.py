"""Batched mode's view of the audio: where it is quiet, what is kept, where windows end.

Frame energies (one per 10 ms mel frame) mark quiet frames; pauses are shortened
(:func:`speech_spans`), the spans kept are laid end to end (:class:`Timeline`, which maps times
back to the file), and the packed audio is cut into windows of 15-30 s at gaps (:class:`WindowCuts`)
or of whole VAD spans (:func:`vad_windows`).
All of it is host-side numpy, run once per file before decoding.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from whisperjax_cli.features import FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES

ENERGY_BLOCK = 6000  # frames (60 s) per step of frame_energy


def frame_energy(audio: np.ndarray) -> np.ndarray:
    """Log power of each 10 ms frame (one value per mel frame), ``[len(audio) // 160]``."""
    n = len(audio) // HOP_LENGTH
    frames = audio[: n * HOP_LENGTH].reshape(n, HOP_LENGTH)
    energy = np.empty(n, np.float64)
    for i in range(0, n, ENERGY_BLOCK):  # in blocks: float64 temporaries of the whole file are 4x its audio
        block = frames[i : i + ENERGY_BLOCK].astype(np.float64)
        energy[i : i + ENERGY_BLOCK] = np.log10(np.mean(block * block, axis=1) + 1e-10)
    return energy


QUIET_BELOW_LEVEL = 3.5  # log10 power: 35 dB under the file's speech level is quiet
QUIET_FLOOR = -8.0  # the mean power of audio under -80 dBFS: quiet in any file
PAUSE_MIN = 30  # frames: a quiet run this long is a pause that packing shortens
PAUSE_KEEP = 20  # frames of a pause kept on each side of the speech around it
GAP_TIERS = (15, 8)  # frames: quiet runs where a window may end, longest first (sentences, words)
FILL_MIN = 1500  # frames: a packed window ends at a gap no earlier than 15 s in
CUT_SEARCH = 500  # frames: with no gap there, the quietest point of a window's last 5 s
BREAK_MIN = 500  # frames: 5 s or more of the file dropped make a break (see WindowCuts, seams.py)


def quiet_frames(energy: np.ndarray) -> np.ndarray:
    """Which frames are quiet: 35 dB under the file's speech level (the 98th percentile of
    its ``energy``, :func:`frame_energy`) or under -80 dBFS. Noisy audio has few or none."""
    if not len(energy):
        return np.zeros(0, bool)
    return energy < max(float(np.percentile(energy, 98)) - QUIET_BELOW_LEVEL, QUIET_FLOOR)


def quiet_runs(quiet: np.ndarray) -> np.ndarray:
    """``[start, end)`` of each run of quiet frames, ``[runs, 2]``."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], quiet.astype(np.int8), [0]])))
    return edges.reshape(-1, 2)


def speech_spans(quiet: np.ndarray, start: int, end: int) -> list[tuple[int, int]]:
    """The frames of ``[start, end)`` worth decoding: all but the middle of its pauses.

    A run of ``quiet`` frames 0.3 s or longer is a pause: its first and last 0.2 s are kept,
    the rest dropped (a 60 s silence becomes 0.4 s, as a 1.2 s pause does); quiet at the
    range's ends is dropped but for the 0.2 s next to the speech. Audio with no quiet run
    keeps everything. Returns ``[start, end)`` spans in order, empty when all is quiet.
    """
    n = max(0, end - start)
    spans, kept = [], 0  # kept: where the audio not yet dropped begins
    for qs, qe in quiet_runs(quiet[start:end]).tolist():
        lo = 0 if qs == 0 else qs + PAUSE_KEEP  # drop [lo, hi)
        hi = n if qe == n else qe - PAUSE_KEEP
        if qe - qs < PAUSE_MIN or hi <= lo:
            continue
        if lo > kept:
            spans.append((start + kept, start + lo))
        kept = hi
    if kept < n:
        spans.append((start + kept, start + n))
    return spans


SEAM_SLACK = 10  # frames: see Timeline.to_source
# A segment across a seam keeps an edge piece on the far side only if it is at least this long
# or this share of the segment (see Timeline.segment_to_source).
EDGE_MIN_FRAMES = 100
EDGE_MIN_SHARE = 0.25


@dataclasses.dataclass(frozen=True)
class Timeline:
    """Spans of a file laid end to end (the audio batched mode decodes), and the way back."""

    spans: tuple[tuple[int, int], ...]  # [start, end) frames of the file, in order
    # frames of the file inside spans where touching VAD chunks were joined: one span to map
    # times through, still separate pieces for windows (see pieces)
    joins: tuple[int, ...] = ()

    @functools.cached_property
    def packed_starts(self) -> np.ndarray:
        lengths = np.array([e - s for s, e in self.spans], np.int64)
        return np.concatenate([[0], np.cumsum(lengths)])

    @property
    def frames(self) -> int:
        return int(self.packed_starts[-1])

    def to_source(self, seconds: float, end: bool = False) -> float:
        """A packed time in seconds → the file's. A start within ``SEAM_SLACK`` before a seam is
        the next span's start, an end as close after one the previous span's end: the model's
        20 ms timestamps land a little off the seams, and a segment that starts just before
        one would otherwise cover all the audio left out there."""
        if not self.spans:
            return seconds
        frame = seconds * FRAMES_PER_SECOND
        shifted = frame - SEAM_SLACK if end else frame + SEAM_SLACK
        side = "left" if end else "right"
        i = int(np.clip(np.searchsorted(self.packed_starts, shifted, side) - 1, 0, len(self.spans) - 1))
        frame = min(max(frame, self.packed_starts[i]), self.packed_starts[i + 1])  # inside span i
        return float(self.spans[i][0] + frame - self.packed_starts[i]) / FRAMES_PER_SECOND

    def segment_to_source(self, start: float, end: float) -> tuple[float, float]:
        """A segment's packed ``[start, end]`` in seconds → the file's.

        Whisper starts a segment where the one before ended: when speech resumes after a seam,
        that start often lies a few tenths of a second before it, and mapped on its own it would
        stretch the segment over all the audio left out there (base wrote " Fresh bread is
        made..." from 30.9 s to 52.5 s over 18 s of noise, bench/nonspeech.py). A piece of the
        segment on the far side of a seam shorter than ``EDGE_MIN_FRAMES`` and than
        ``EDGE_MIN_SHARE`` of the segment is not where its speech is: the start moves to the
        next span, the end to the previous one. Longer pieces on both sides are kept: the model
        did read speech across the seam as one segment (across a break, batched mode cuts it
        first, :mod:`~whisperjax_cli.seams`).
        """
        if not self.spans or end <= start:
            return self.to_source(start), self.to_source(end, end=True)
        s, e = self.trimmed(start, end)
        return self.to_source(s / FRAMES_PER_SECOND), self.to_source(e / FRAMES_PER_SECOND, end=True)

    def trimmed(self, start: float, end: float) -> tuple[float, float]:
        """A segment's packed ``[start, end]`` in seconds → in packed frames, less the short
        edge pieces across a seam that :meth:`segment_to_source` leaves out."""
        s, e = start * FRAMES_PER_SECOND, end * FRAMES_PER_SECOND
        if not self.spans or end <= start:
            return s, e
        starts = self.packed_starts
        first = int(np.clip(np.searchsorted(starts, s, "right") - 1, 0, len(self.spans) - 1))
        last = int(np.clip(np.searchsorted(starts, e, "left") - 1, 0, len(self.spans) - 1))
        if first < last:
            short = min(EDGE_MIN_FRAMES, EDGE_MIN_SHARE * (e - s))
            if starts[first + 1] - s < short:
                s = starts[first + 1]
            if e - starts[last] < short and s < starts[last]:
                e = starts[last]
        return s, e

    @functools.cached_property
    def piece_starts(self) -> np.ndarray:
        """Packed frames where each piece of the packed audio starts (the spans, cut again at
        ``joins``), and where the last ends."""
        joins = np.asarray(self.joins, np.int64)
        inside = [self.packed_starts[i] + joins[(joins > s) & (joins < e)] - s for i, (s, e) in enumerate(self.spans)]
        return np.unique(np.concatenate([self.packed_starts, *inside]))

    def pieces(self) -> np.ndarray:
        """Frames of each piece of packed audio, in order."""
        return np.diff(self.piece_starts)

    def audio(self, audio: np.ndarray) -> np.ndarray:
        return np.concatenate([audio[s * HOP_LENGTH : e * HOP_LENGTH] for s, e in self.spans] or [audio[:0]])

    @functools.cached_property
    def breaks(self) -> np.ndarray:
        """Packed frames where ``BREAK_MIN`` or more frames of the file were left out."""
        gaps = np.array([b[0] - a[1] for a, b in zip(self.spans, self.spans[1:])], np.int64)
        return self.packed_starts[1:-1][gaps >= BREAK_MIN]

    def holds_break(self, start: int, stop: int) -> bool:
        """Whether a break lies inside the packed frames ``(start, stop)``."""
        return bool(np.any((self.breaks > start) & (self.breaks < stop)))

    def frames_of(self, values: np.ndarray) -> np.ndarray:
        """Per-frame ``values`` of the file, those of the packed audio."""
        return np.concatenate([values[s:e] for s, e in self.spans] or [values[:0]])


def chunk_timeline(chunks: list[tuple[int, int]], clips: list[tuple[int, int]]) -> Timeline:
    """The timeline of VAD chunks ``[start, end)`` (frames, in order) inside ``clips``: chunks
    that touch or overlap are joined into one span, the joins kept (:attr:`Timeline.joins`)."""
    spans: list[tuple[int, int]] = []
    joins: list[int] = []
    for start, end in chunks:
        for clip_start, clip_end in clips:
            lo, hi = max(start, clip_start), min(end, clip_end)
            if lo >= hi:
                continue
            if spans and lo <= spans[-1][1]:
                if hi > spans[-1][1]:
                    joins.append(spans[-1][1])
                    spans[-1] = (spans[-1][0], hi)
            else:
                spans.append((lo, hi))
    return Timeline(tuple(spans), tuple(joins))


class WindowCuts:
    """Where batched mode ends the windows of packed audio, from its frames' ``quiet`` and ``energy``.

    A window ends in the middle of the last gap that lies 15-30 s after its start: a quiet run
    of 0.15 s or more (a pause, the end of a sentence) if there is one, else one of 0.08 s (a
    comma, a breath between words), else the quietest 0.2 s of its last 5 s. It always ends at
    a ``break`` (where 5 s or more of the file were dropped): in one window the model reads the
    speech on both sides of a shortened silence as one segment, shown all through the silence.
    """

    def __init__(self, quiet: np.ndarray, energy: np.ndarray, breaks: np.ndarray = np.zeros(0, np.int64)):
        runs = quiet_runs(quiet)
        lengths, middles = runs[:, 1] - runs[:, 0], (runs[:, 0] + runs[:, 1]) // 2
        self.tiers = [middles[lengths >= n] for n in GAP_TIERS]
        self.smooth = np.convolve(energy, np.ones(20) / 20, mode="same") if len(energy) else energy
        self.quiet, self.breaks = quiet, np.asarray(breaks)

    def end(self, start: int, limit: int) -> int:
        """The end of the window that starts at ``start``, in a stretch that ends at ``limit``."""
        ahead = self.breaks[(self.breaks > start) & (self.breaks < limit)]
        limit = int(ahead.min()) if len(ahead) else limit
        if limit - start <= N_FRAMES:
            return limit
        for gaps in self.tiers:
            inside = gaps[(gaps >= start + FILL_MIN) & (gaps <= start + N_FRAMES)]
            if len(inside):
                return int(inside[-1])
        lo = start + N_FRAMES - CUT_SEARCH
        return lo + 1 + int(np.argmin(self.smooth[lo + 1 : start + N_FRAMES + 1]))

    def windows(self) -> list[tuple[int, int]]:
        """``[start, end)`` of every window, one after another, covering the packed audio."""
        total, out = len(self.smooth), []
        while not out or out[-1][1] < total:
            start = out[-1][1] if out else 0
            out.append((start, self.end(start, total)))
        return out if total else []

    def middle(self, start: int, stop: int) -> int:
        """Where to cut ``[start, stop)`` in two: the gap nearest its middle (the longest kind
        within its middle third), else the quietest 0.2 s there."""
        lo, hi = start + (stop - start) // 3, stop - (stop - start) // 3
        for gaps in self.tiers:
            inside = gaps[(gaps >= lo) & (gaps <= hi)]
            if len(inside):
                return int(inside[np.argmin(np.abs(inside - (start + stop) // 2))])
        return lo + int(np.argmin(self.smooth[lo:hi]))

    def sound_end(self, start: int, stop: int) -> int:
        """Where the last frame of ``[start, stop)`` that is not quiet ends (``start`` if none)."""
        loud = np.flatnonzero(~self.quiet[start:stop])
        return start + int(loud[-1]) + 1 if len(loud) else start


def vad_windows(timeline: Timeline) -> list[tuple[int, int]]:
    """Batched windows of VAD speech spans, in packed frames: as many as faster-whisper's
    batched pipeline makes (consecutive spans merged while they fit 30 s, whatever the audio
    left out between them), with the shortest longest window that count allows (its rule fills
    30 s and leaves a short rest).

    On bench/nonspeech.py (ten passages between long stretches of non-speech) windows of one
    passage each lost context: WER base 11.71 %, tiny.en 14.24; faster-whisper's windows 6.65
    and 15.51; these 7.28 and 13.92. A segment read across 5 s or more left out is cut there
    (:mod:`~whisperjax_cli.seams`). A span longer than 30 s is a window of its own. Windows
    fill by VAD chunk (:meth:`Timeline.pieces`), not by the spans that touching chunks were
    joined into: bench/longform.py's paragraphs, read with short pauses, joined into spans of
    over 30 s, each decoded as 30 s and a short rest (39 passes over its 27 windows).
    """
    lengths = timeline.pieces()
    count = len(_fill(lengths, N_FRAMES))
    low, high = 1, N_FRAMES
    while low < high:  # the smallest cap that fills no more windows than 30 s does
        middle = (low + high) // 2
        low, high = (low, middle) if len(_fill(lengths, middle)) <= count else (middle + 1, high)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return [(int(starts[a]), int(starts[b])) for a, b in _fill(lengths, low)]


def _fill(lengths: np.ndarray, cap: int) -> list[tuple[int, int]]:
    """``[first, stop)`` span indices of runs of consecutive ``lengths`` summing to at most
    ``cap`` (a longer one alone), each run as long as fits."""
    runs: list[tuple[int, int]] = []
    total = 0
    for i, n in enumerate(lengths.tolist()):
        if runs and total + n <= cap:
            runs[-1], total = (runs[-1][0], i + 1), total + n
        else:
            runs.append((i, i + 1))
            total = n
    return runs


def group_windows(windows: list, groups: int) -> list[list]:
    """``windows`` in ``groups`` runs of consecutive ones, as equal in number as can be."""
    groups = max(1, min(groups, len(windows)))
    bounds = [len(windows) * i // groups for i in range(groups + 1)]
    return [windows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
