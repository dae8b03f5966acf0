"""Word edges snapped onto the pauses of the audio (stable-ts's idea, our own dynamic program).

OpenAI's word times are 20 ms steps of a smoothed attention map, often 0.1-0.3 s off the audio.
:func:`pauses` finds a window's quiet runs (from frame energy, or from the VAD's speech
probabilities); :func:`refine_words` moves every edge between words onto a pause within a radius
when that costs least overall. :mod:`whisperjax_cli.timing` calls both for each window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

from whisperjax_cli.features import FRAMES_PER_SECOND, HOP_LENGTH
from whisperjax_cli.packing import QUIET_FLOOR, frame_energy, quiet_runs
from whisperjax_cli.results import Word

if TYPE_CHECKING:
    from whisperjax_cli.timing import WordOptions

NOISE_MARGIN = 1.0  # log10 power (10 dB) over the noise floor that a frame must rise to be a sound
CLICK_FRAMES = 3  # a sound this short (30 ms) between two quiet runs does not split them
LATE_START_COST = 0.1  # per second between the first word's refined start and its end (see refine_words)
MIN_WORD = 0.02  # seconds: refinement leaves every word at least this long (or as long as it was)


def pauses(samples: Optional[np.ndarray], speech: Optional[np.ndarray], options: WordOptions) -> np.ndarray:
    """The pauses of a window's content: runs of quiet 10 ms frames, ``[n, 2]`` seconds from its start.

    A frame is quiet when its speech probability is under ``options.speech_threshold`` (when
    ``speech`` is given), else when its power is ``options.quiet_db`` under the window's speech
    level (its 95th percentile frame), within 10 dB of its noise floor (its 5th percentile: in a
    noisy recording the first bound is under the noise) or under -80 dBFS. Sounds of 30 ms or
    less do not split a pause (a click); pauses shorter than ``options.min_pause`` are dropped,
    except at the window's edges.
    """
    if speech is not None:
        quiet = np.asarray(speech, np.float64) < options.speech_threshold
    elif samples is not None and len(samples) >= HOP_LENGTH:
        energy = frame_energy(np.asarray(samples, np.float32))
        level, floor = np.percentile(energy, [95, 5])
        quiet = energy < max(level - options.quiet_db / 10, floor + NOISE_MARGIN, QUIET_FLOOR)
    else:
        return np.zeros((0, 2))
    sounds = quiet_runs(~quiet)  # [n, 2] frames
    clicks = sounds[(sounds[:, 1] - sounds[:, 0] <= CLICK_FRAMES) & (sounds[:, 0] > 0) & (sounds[:, 1] < len(quiet))]
    for start, stop in clicks:
        quiet[start:stop] = True
    runs = quiet_runs(quiet)  # [n, 2] frames
    shortest = round(options.min_pause * FRAMES_PER_SECOND)
    keep = (runs[:, 1] - runs[:, 0] >= shortest) | (runs[:, 0] == 0) | (runs[:, 1] == len(quiet))
    return runs[keep] / FRAMES_PER_SECOND


def _gap(pause: np.ndarray, left: float, right: float) -> float:
    """Distance from ``[min(left, right), max(left, right)]`` to ``pause`` (0 where they overlap)."""
    low, high = min(left, right), max(left, right)
    return float(max(pause[0] - high, low - pause[1], 0.0))


def refine_words(words: list[Word], found: np.ndarray, radius: float, window_start: Optional[float] = None) -> None:
    """Moves word edges onto the pauses of the audio, in place.

    Every edge between two words (the first start and the last end too) may move onto a pause
    (the word before ending where it begins, the word after starting where it ends) at most
    ``radius`` away, or stay, at a cost of ``radius``. The choice for all edges is made at once,
    the least total distance that keeps every word at least 20 ms long (dynamic programming
    over the edges, each pause used once): one edge at a time, a late edge would take the pause
    after a short word instead of the one before it. Then words no longer overlap.

    Args:
      words: one window's words in order, times in seconds.
      found: the window's pauses ``[n, 2]`` in the same time base (:func:`pauses`, offset).
      radius: the largest move in seconds.
      window_start: the window's first second; a first word starting there may start at any
        pause before its end, the latest preferred.
    """
    if not words or not len(found):
        return
    edges = [(words[0].start, words[0].start)] + [(a.end, b.start) for a, b in zip(words, words[1:])]
    edges.append((words[-1].end, words[-1].end))
    # per edge, its options as (cost, end of the word before, start of the word after)
    options = [[(radius, left, right)] + [(_gap(p, left, right), float(p[0]), float(p[1])) for p in found
                                          if _gap(p, left, right) <= radius] for left, right in edges]
    first = words[0]
    if window_start is not None and first.start <= window_start + 2 / FRAMES_PER_SECOND:
        # Starting with the window, the first word starts where the path began, not where it
        # does: any pause before its end may be where it starts, the latest preferred (the
        # quiet before a first word is often cut in two by a noise).
        options[0] = [(radius, first.start, first.start)] + [
            (LATE_START_COST * (first.end - p[1]), float(p[0]), float(p[1])) for p in found
            if p[1] <= first.end - MIN_WORD]
    costs, links = [np.asarray([c for c, _, _ in options[0]])], []
    for k in range(1, len(options)):
        before, word = options[k - 1], words[k - 1]
        shortest = min(MIN_WORD, word.end - word.start)
        step = np.array([[total if left - start >= shortest else np.inf for total, (_, _, start)
                          in zip(costs[-1], before)] for _, left, _ in options[k]])  # [now, before]
        links.append(np.argmin(step, axis=1))
        costs.append(step.min(axis=1) + np.asarray([c for c, _, _ in options[k]]))
    if not np.isfinite(costs[-1]).any():
        return
    pick = int(np.argmin(costs[-1]))
    for k in range(len(options) - 1, 0, -1):
        words[k - 1].end = options[k][pick][1]
        pick = int(links[k - 1][pick])
        words[k - 1].start = options[k - 1][pick][2]
    for a, b in zip(words, words[1:]):
        a.end = min(a.end, b.start)
