"""The state of long-form transcription: one :class:`Stream` per stretch of a file decoded with
OpenAI's loop (its seek, prompt and segments), one :class:`FileState` per open file, and the
:class:`FileEvent` that :func:`~whisperjax_cli.longform.transcribe_files` yields. The loop
that advances them is :class:`~whisperjax_cli.longform.Transcriber`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from whisperjax_cli.features import FRAMES_PER_SECOND, N_FRAMES, LogMelWindows
from whisperjax_cli.packing import Timeline, WindowCuts
from whisperjax_cli.results import Segment, Transcript

HOLD_MARGIN = 100  # frames: a packed window may end once a timestamp is within 1 s of its last sound


@dataclasses.dataclass
class Stream:
    """OpenAI's per-file loop state, for one stretch ``clips`` of a file's mel."""

    file: int
    clips: list[tuple[int, int]]  # [start, end) mel frames to decode
    prompt: list[int]  # all_tokens (initial prompt included)
    prompt_reset_since: int = 0
    clip_index: int = 0
    seek: int = 0
    segments: list[Segment] = dataclasses.field(default_factory=list)
    done: bool = False
    packed: bool = False  # batched mode: each clip is a window, decoded once
    split: set = dataclasses.field(default_factory=set)  # clips that are halves of a looped window
    last_speech: float = 0.0  # word timestamps: the end of the last word (OpenAI's last_speech_timestamp)

    def __post_init__(self):
        self.seek = self.clips[0][0] if self.clips else 0
        self.advance()

    def advance(self) -> None:
        """Moves past finished clips (OpenAI's clip loop); marks the stream done at the end."""
        while self.clip_index < len(self.clips):
            start, end = self.clips[self.clip_index]
            self.seek = max(self.seek, start)
            if self.seek < end:
                return
            self.clip_index += 1
        self.done = True

    @property
    def clip_end(self) -> int:
        return self.clips[self.clip_index][1]


@dataclasses.dataclass
class FileState:
    """One open file: its log-mel, language, streams and (batched mode) packing."""

    index: int
    source: Any
    mel: LogMelWindows  # log-mel on demand, 30 s of zero audio appended (as OpenAI)
    content_frames: int  # of the audio decoded (in batched mode, the packed audio)
    language: Optional[str]
    language_probability: Optional[float]
    sot_sequence: tuple[int, ...]
    streams: list[Stream]
    timeline: Optional[Timeline] = None  # batched mode: where the packed audio comes from
    source_frames: Optional[int] = None  # the file's own length, when packed
    cuts: Optional[WindowCuts] = None  # batched mode: where its windows end
    emitted: int = 0  # segments already handed out
    first_audio: Any = None  # encoder output [1, n_audio_ctx, state] of frames [0, N_FRAMES), if made already

    def take_first_audio(self, s: Stream, size: int):
        """The encoder output language detection made of this file's first window, for the
        stream about to decode that same window (frames ``[0, N_FRAMES)``), else None. Asked
        at the file's first step, it is let go either way: no later window is that one."""
        first = self.is_first_window(s, size)
        audio, self.first_audio = self.first_audio, None
        return audio if first else None

    def is_first_window(self, s: Stream, size: int) -> bool:
        """Whether ``s``'s window of ``size`` frames is the one language detection encoded
        (frames ``[0, N_FRAMES)``), while its output is still held."""
        return self.first_audio is not None and s.seek == 0 and size == N_FRAMES

    @property
    def duration(self) -> float:
        return (self.content_frames if self.source_frames is None else self.source_frames) / FRAMES_PER_SECOND

    def to_source(self, seconds: float, end: bool = False) -> float:
        return seconds if self.timeline is None else self.timeline.to_source(seconds, end)

    def segment_to_source(self, start: float, end: float) -> tuple[float, float]:
        """A segment's decoded ``[start, end]`` → the file's (see Timeline.segment_to_source)."""
        return (start, end) if self.timeline is None else self.timeline.segment_to_source(start, end)

    def window_size(self, s: Stream) -> int:
        """Frames of the stream's next window: 30 s, or to its clip's end (a packed window's)."""
        return min(N_FRAMES, self.content_frames - s.seek, s.clip_end - s.seek)

    def hold(self, s: Stream, size: int) -> int:
        """The timestamp index before which the model may not end a packed window: 1 s before
        the end of its last sound (see :func:`~whisperjax_cli.timestamps.hold_end_of_text`)."""
        end = self.cuts.sound_end(s.seek, s.seek + size) - s.seek
        return max(0, end - HOLD_MARGIN) // 2


@dataclasses.dataclass
class FileEvent:
    """What :func:`transcribe_files` yields: new segments of a file, its end, or its error."""

    index: int
    source: Any
    segments: list[Segment]
    transcript: Optional[Transcript] = None  # set once the file is complete
    error: Optional[Exception] = None
    language: Optional[str] = None


def parse_clip_timestamps(clip_timestamps, content_frames: int) -> list[tuple[int, int]]:
    """``"0"``, ``"10,20,40"`` or a list of seconds → [start, end) frame pairs (OpenAI)."""
    if isinstance(clip_timestamps, str):
        values = [float(t) for t in clip_timestamps.split(",") if t.strip()]
    else:
        values = [float(t) for t in (clip_timestamps or [0.0])]
    frames = [round(t * FRAMES_PER_SECOND) for t in values] or [0]
    if len(frames) % 2 == 1:
        frames.append(content_frames)
    return [(min(s, content_frames), min(e, content_frames)) for s, e in zip(frames[::2], frames[1::2])]
