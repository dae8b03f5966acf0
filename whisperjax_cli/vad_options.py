"""Speech-timestamp options (faster-whisper's ``VadOptions``): no numpy or JAX import, so the
options object and the CLI's usage errors stay light. The model and the rules are in vad.py."""

from __future__ import annotations

import dataclasses
import math
import numbers

from whisperjax_cli.errors import UsageError


@dataclasses.dataclass(frozen=True)
class VadOptions:
    """Speech-timestamp options: faster-whisper's ``VadOptions``, same names and defaults.

    Attributes:
        threshold: A chunk whose speech probability is at least this starts (or continues)
            speech.
        neg_threshold: Speech ends only below this (hysteresis, so that a dip just under
            ``threshold`` does not cut a word); None: ``max(threshold - 0.15, 0.01)``.
        min_speech_duration_ms: Speech segments this short or shorter are dropped.
        max_speech_duration_s: Longer speech is split at its last silence of more than 98 ms
            (or, without one, just before this length), so that a segment fits a window.
        min_silence_duration_ms: Silence must last this long to end a segment.
        speech_pad_ms: Segments are widened by this much on each side (half the gap when two
            would overlap), so that soft onsets and endings are kept.
    """

    threshold: float = 0.5
    neg_threshold: float | None = None
    min_speech_duration_ms: float = 0
    max_speech_duration_s: float = float("inf")
    min_silence_duration_ms: float = 2000
    speech_pad_ms: float = 400

    def __post_init__(self):
        def number(name: str, allow_inf: bool = False) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise UsageError(None, f"VAD {name} must be a number, got {value!r}")
            if math.isnan(value) or (math.isinf(value) and not allow_inf):
                raise UsageError(None, f"VAD {name} must be a finite number, got {value}")
            return float(value)

        if not 0 < number("threshold") < 1:
            raise UsageError(None, f"VAD threshold must be between 0 and 1 (exclusive), got {self.threshold}")
        if self.neg_threshold is not None and not 0 < number("neg_threshold") <= self.threshold:
            raise UsageError(None, f"VAD neg_threshold must be above 0 and at most threshold ({self.threshold}), "
                                   f"got {self.neg_threshold}")
        for name in ("min_speech_duration_ms", "min_silence_duration_ms", "speech_pad_ms"):
            if number(name) < 0:
                raise UsageError(None, f"VAD {name} must be >= 0, got {getattr(self, name)}")
        if number("max_speech_duration_s", allow_inf=True) <= 0:
            raise UsageError(None, f"VAD max_speech_duration_s must be > 0, got {self.max_speech_duration_s}")


def batched_vad_options(options: VadOptions | None = None, chunk_length: float = 30) -> VadOptions:
    """The options faster-whisper's batched pipeline uses: segments that fit one window.

    Its ``BatchedInferencePipeline`` forces ``max_speech_duration_s`` to the window length
    and, when given no options, also ends speech after 160 ms of silence (not 2 s), so that
    windows hold whole phrases.
    """
    if options is None:
        return VadOptions(max_speech_duration_s=chunk_length, min_silence_duration_ms=160)
    return dataclasses.replace(options, max_speech_duration_s=chunk_length)
