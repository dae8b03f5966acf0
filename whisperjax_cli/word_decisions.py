"""OpenAI's uses of word timings in the long-form loop: where the next window starts, and
``hallucination_silence_threshold`` (anomalous words and segments, the silences around them).
Pure functions of segments with words; the words themselves come from :mod:`whisperjax_cli.timing`."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from whisperjax_cli.features import FRAMES_PER_SECOND, N_FRAMES
from whisperjax_cli.results import Segment, Word

PUNCTUATION = "\"'“¿([{-\"'.。,，!！?？:：”)]}、"  # words that are only these are not scored (OpenAI)
SILENCE_NEAR_EDGE = 2.0  # seconds: a segment this close to its window's edge counts as next to silence


def word_anomaly_score(word: Word) -> float:
    """OpenAI's anomaly score of a word: improbable (< 0.15), very short (< 0.133 s, up to 2 per
    word) or very long (> 2 s) words score; hallucinations are made of them."""
    score = 1.0 if word.probability < 0.15 else 0.0
    duration = word.end - word.start
    if duration < 0.133:
        score += (0.133 - duration) * 15
    if duration > 2.0:
        score += duration - 2.0
    return score


def is_segment_anomaly(segment: Optional[Segment]) -> bool:
    """OpenAI's test for a hallucinated segment: its first 8 words (punctuation aside) score 3 or
    more together, or nearly 1 each."""
    if segment is None or not segment.words:
        return False
    words = [w for w in segment.words if w.word not in PUNCTUATION][:8]
    score = sum(word_anomaly_score(w) for w in words)
    return score >= 3 or score + 0.01 >= len(words)


def last_word_end(segments: Sequence[Segment]) -> Optional[float]:
    """OpenAI's ``get_end``: the end of the last word, else of the last segment, else None."""
    ends = [w.end for s in segments for w in s.words or []]
    return ends[-1] if ends else (segments[-1].end if segments else None)


@dataclasses.dataclass(frozen=True)
class WordSeek:
    """Where a stream goes after a window with word timestamps (see :func:`word_seek`).

    Attributes:
      seek: the mel frame the stream's next window starts at.
      keep: how many of the window's segments to keep; the rest are dropped.
      again: OpenAI's ``continue``: the window's text is dropped whole and the stream decodes
        again from ``seek`` (past a silence before a likely hallucination), with nothing else
        updated (prompt, last speech time).
    """

    seek: int
    keep: int
    again: bool = False


def word_seek(segments: Sequence[Segment], *, seek: int, previous_seek: int, segment_size: int,
              single_timestamp_ending: bool, content_frames: int, last_speech_timestamp: float,
              hallucination_silence_threshold: Optional[float] = None) -> WordSeek:
    """OpenAI's use of one window's words in the long-form loop.

    Without a single timestamp at the end, the next window starts at the last word's end rather
    than the last timestamp. With ``hallucination_silence_threshold`` (seconds), it moves on to
    the last word only when more than that is left of the window; a first segment that looks
    hallucinated (:func:`is_segment_anomaly`) after a longer silence is skipped to, and decoded
    again; and a hallucinated segment with silence (or hallucinations) on both sides is dropped
    with all after it, the stream moving on to its start.

    Args:
      segments: the window's segments with words, in its time base (sequential mode: the file's).
      seek: where the segment split moved the stream (after the last timestamp, or the window).
      previous_seek: the window's first frame.
      segment_size: the window's content frames.
      single_timestamp_ending: the window's tokens ended with one timestamp (no speech after).
      content_frames: the file's (or clip's) frames: where the stream ends.
      last_speech_timestamp: the last word's end before this window.
      hallucination_silence_threshold: OpenAI's option; None: off.
    """
    time_offset = previous_seek / FRAMES_PER_SECOND
    end = last_word_end(segments)
    if not single_timestamp_ending and end is not None and end > time_offset:
        seek = round(end * FRAMES_PER_SECOND)
        window_end = (previous_seek + N_FRAMES) / FRAMES_PER_SECOND
        if hallucination_silence_threshold is not None and window_end - end <= hallucination_silence_threshold:
            seek = previous_seek + segment_size
    if hallucination_silence_threshold is None:
        return WordSeek(seek, len(segments))
    first = next((s for s in segments if s.words), None)
    if is_segment_anomaly(first) and first.start - time_offset > hallucination_silence_threshold:
        return WordSeek(previous_seek + round((first.start - time_offset) * FRAMES_PER_SECOND), 0, again=True)
    cut = _hallucination_cut(segments, previous_seek, segment_size, last_speech_timestamp,
                             hallucination_silence_threshold)
    if cut is None:
        return WordSeek(seek, len(segments))
    index, start = cut
    seek = round(max(time_offset + 1, start) * FRAMES_PER_SECOND)
    if content_frames / FRAMES_PER_SECOND - segments[index].end < hallucination_silence_threshold:
        seek = content_frames
    return WordSeek(seek, index)


def _hallucination_cut(segments: Sequence[Segment], previous_seek: int, segment_size: int,
                       last_speech: float, threshold: float) -> Optional[tuple[int, float]]:
    """The first hallucinated segment with silence (or more hallucination) on both sides, as
    ``(index, start)``, or None (OpenAI's loop over ``current_segments``)."""
    time_offset = previous_seek / FRAMES_PER_SECOND
    window_end = (previous_seek + N_FRAMES) / FRAMES_PER_SECOND
    for i, segment in enumerate(segments):
        if not segment.words:
            continue
        if is_segment_anomaly(segment):
            following = next((s for s in segments[i + 1 :] if s.words), None)
            next_start = following.words[0].start if following else time_offset + segment_size / FRAMES_PER_SECOND
            before = (segment.start - last_speech > threshold or segment.start < threshold
                      or segment.start - time_offset < SILENCE_NEAR_EDGE)
            after = (next_start - segment.end > threshold or is_segment_anomaly(following)
                     or window_end - segment.end < SILENCE_NEAR_EDGE)
            if before and after:
                return i, segment.start
        last_speech = segment.end
    return None
