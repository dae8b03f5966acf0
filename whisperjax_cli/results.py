"""Typed results of transcription: segments, words and whole transcripts."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional


@dataclasses.dataclass
class Word:
    start: float
    end: float
    word: str
    probability: float


@dataclasses.dataclass
class Segment:
    """One decoded segment, with openai-whisper's fields (times in seconds from the file start)."""

    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: Optional[list[Word]] = None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if self.words is None:
            del out["words"]
        return out


@dataclasses.dataclass
class Transcript:
    """A whole file's result. ``segments`` is a list once complete."""

    text: str
    segments: list[Segment]
    language: Optional[str]
    language_probability: Optional[float]
    duration: float
    model: Optional[str] = None

    def to_dict(self) -> dict:
        """openai-whisper's JSON keys as a superset."""
        return {
            "text": self.text,
            "segments": [s.to_dict() for s in self.segments],
            "language": self.language,
            "language_probability": self.language_probability,
            "duration": self.duration,
            "model": self.model,
        }

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)
