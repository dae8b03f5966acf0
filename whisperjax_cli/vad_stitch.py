"""Speech-only audio and the map from its times back to the original's (faster-whisper's
``collect_chunks`` and ``SpeechTimestampsMap``).

With ``--vad``, transcription reads only the speech segments, joined end to end as
faster-whisper's ``vad_filter`` does; the times it finds in that joined audio are moved back by
the silence removed before them. ``chunks`` are ``[{"start": sample, "end": sample}, ...]`` in
order, as :func:`whisperjax_cli.vad.speech_timestamps` returns them.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

SAMPLE_RATE = 16000


def speech_audio(audio: np.ndarray, chunks: Sequence[dict]) -> np.ndarray:
    """The speech segments of ``audio`` joined end to end (an empty array when there are none)."""
    if not chunks:
        return np.zeros(0, np.float32)
    return np.concatenate([audio[c["start"]: c["end"]] for c in chunks]).astype(np.float32, copy=False)


def collect_chunks(
    audio: np.ndarray,
    chunks: Sequence[dict],
    sampling_rate: int = SAMPLE_RATE,
    max_duration: float = float("inf"),
) -> tuple[list[np.ndarray], list[dict]]:
    """Joins speech segments into pieces of at most ``max_duration`` seconds, in order.

    faster-whisper's batched pipeline makes its windows this way (``max_duration`` 30): a
    piece ends before the segment that would make it too long.

    Returns:
        The pieces' audio, and per piece ``{"offset": s, "duration": s, "segments": [...]}``:
        ``offset`` is where the piece starts in the speech-only timeline (seconds of speech
        before it, which :class:`SpeechTimestampsMap` maps back), ``segments`` its chunks.
        Audio, offsets and durations are faster-whisper's; two slips of its version are not
        copied: its ``segments`` miss the first chunk of every piece after the first, and a
        first chunk longer than ``max_duration`` gives it an empty leading piece.
    """
    if not chunks:
        return [np.zeros(0, np.float32)], [{"offset": 0, "duration": 0, "segments": []}]
    groups: list[list[dict]] = [[]]
    length = 0
    for chunk in chunks:
        size = chunk["end"] - chunk["start"]
        if groups[-1] and length + size > max_duration * sampling_rate:
            groups.append([])
            length = 0
        groups[-1].append(chunk)
        length += size
    pieces, metadata, before = [], [], 0
    for group in groups:
        length = sum(c["end"] - c["start"] for c in group)
        metadata.append({"offset": before / sampling_rate, "duration": length / sampling_rate, "segments": group})
        pieces.append(speech_audio(audio, group))
        before += length
    return pieces, metadata


class SpeechTimestampsMap:
    """Maps a time in the speech-only audio back to the original audio's (faster-whisper's).

    A time falls in the chunk whose joined end is after it (a time exactly at a chunk's end,
    when it is an end time, stays in that chunk), and moves by the silence removed before
    that chunk; results are rounded to ``time_precision`` decimals.
    """

    def __init__(self, chunks: Sequence[dict], sampling_rate: int = SAMPLE_RATE, time_precision: int = 2):
        self.sampling_rate = sampling_rate
        self.time_precision = time_precision
        self.chunk_end_sample: list[int] = []  # each chunk's end in the joined audio
        self.total_silence_before: list[float] = []  # seconds removed before each chunk
        previous_end = silent = 0
        for chunk in chunks:
            silent += chunk["start"] - previous_end
            previous_end = chunk["end"]
            self.chunk_end_sample.append(chunk["end"] - silent)
            self.total_silence_before.append(silent / sampling_rate)

    def get_original_time(self, time: float, chunk_index: int | None = None, is_end: bool = False) -> float:
        """``time`` (seconds in the joined audio) in the original audio.

        Args:
            time: Seconds into the speech-only audio.
            chunk_index: The chunk to place it in (faster-whisper places both ends of a word
                in the chunk of its middle); default :meth:`get_chunk_index`.
            is_end: ``time`` ends something, so a time at a chunk's end stays in that chunk.
        """
        if chunk_index is None:
            chunk_index = self.get_chunk_index(time, is_end)
        return round(self.total_silence_before[chunk_index] + time, self.time_precision)

    def get_chunk_index(self, time: float, is_end: bool = False) -> int:
        """The chunk that ``time`` (seconds in the joined audio) falls in.

        Raises:
            ValueError: There are no chunks (no speech: nothing to map).
        """
        if not self.chunk_end_sample:
            raise ValueError("SpeechTimestampsMap: no speech chunks to map times into")
        sample = int(time * self.sampling_rate)
        if is_end and sample in self.chunk_end_sample:
            return self.chunk_end_sample.index(sample)
        return min(bisect.bisect(self.chunk_end_sample, sample), len(self.chunk_end_sample) - 1)
