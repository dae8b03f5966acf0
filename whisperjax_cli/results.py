"""Typed results of transcription: segments, words and whole transcripts."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional


@dataclasses.dataclass
class Word:
    """One word of a segment: its text (with its leading space), times in seconds from the file
    start, and the mean probability of its tokens."""

    start: float
    end: float
    word: str
    probability: float

    def to_dict(self) -> dict:
        """openai-whisper's word shape, its key order included."""
        return {"word": self.word, "start": self.start, "end": self.end, "probability": self.probability}


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
        """openai-whisper's segment keys; ``words`` only when word timings were computed."""
        out = dataclasses.asdict(self)
        if self.words is None:
            del out["words"]
        else:
            out["words"] = [w.to_dict() for w in self.words]
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
