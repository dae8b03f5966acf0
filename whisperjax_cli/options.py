"""Every transcription option in one frozen, validated object (no JAX import here).

:class:`TranscribeOptions` carries openai-whisper's names and defaults (its ``DecodingOptions``
and ``transcribe()`` keywords) plus wjx's own (``mode``, ``batch_size``, ``stop_loops``). It is
built once, by the CLI from flags or by the library from keyword arguments
(:meth:`TranscribeOptions.create`), and validated in :meth:`~TranscribeOptions.__post_init__`:
every bad value raises :class:`~whisperjax_cli.errors.UsageError` (exit code 2). Defaults that
depend on the mode (the temperature ladder, conditioning on previous text) are resolved there
too, so whoever reads an options object sees the values that will be used.

The decoding loops never see this object: :class:`~whisperjax_cli.window_decoder.WindowDecoder`
derives their static settings from it once (:class:`~whisperjax_cli.decoding.LoopConfig`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Union

from whisperjax_cli.errors import UsageError
from whisperjax_cli.vad_options import VadOptions, batched_vad_options

MODES = ("sequential", "batched")
TASKS = ("transcribe", "translate")
OPENAI_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # openai-whisper's fallback ladder
MAX_BATCH = 1024  # rows decoded together: far past any device's sweet spot, and bounded memory

Temperature = Union[float, tuple[float, ...]]


def temperature_ladder(temperature: float, increment: Optional[float]) -> tuple[float, ...]:
    """openai-whisper's fallback ladder: from ``temperature`` up to 1.0 in steps of ``increment``.

    ``increment`` None or 0 means no fallback (``(temperature,)``), as openai-whisper's CLI.
    """
    _check_temperature(temperature, "temperature")
    if increment is None or increment == 0:
        return (float(temperature),)
    if not math.isfinite(increment) or increment < 0:
        raise UsageError("--temperature-increment-on-fallback", f"must be a number >= 0, not {increment}")
    count = int((1.0 - temperature) / increment + 1e-6) + 1
    return tuple(round(temperature + k * increment, 6) for k in range(count))


def _check_temperature(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"--{name.replace('_', '-')}", f"must be a number from 0 to 1, not {value!r}")
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"--{name.replace('_', '-')}", f"must be from 0 to 1, not {value}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class TranscribeOptions:
    """What to decode and how. Field names and defaults are openai-whisper's unless noted.

    ``None`` in ``temperature`` and ``condition_on_previous_text`` means "the mode's default"
    and is replaced at construction: sequential mode falls back through 0, 0.2 ... 1.0 and
    conditions on the previous text (OpenAI); batched mode decodes at 0 alone without the
    previous text (faster-whisper's batched pipeline).
    """

    # -- what
    task: str = "transcribe"  # or "translate" (into English)
    language: Optional[str] = None  # code or English name; None: detect (multilingual models)
    # -- sampling and search
    temperature: Optional[Temperature] = None  # a number, or the fallback ladder as a tuple
    best_of: Optional[int] = 5  # samples per window at temperature > 0
    beam_size: Optional[int] = None  # beam search at temperature 0; None: greedy
    patience: Optional[float] = None  # beam search: finish after beam_size * patience endings
    length_penalty: Optional[float] = None  # alpha of ((5 + n) / 6) ** alpha; None: divide by n
    sample_len: int = 224  # tokens sampled per window at most (n_text_ctx // 2)
    # -- filters
    suppress_tokens: Union[str, tuple[int, ...]] = "-1"  # "-1": OpenAI's non-speech symbols
    suppress_blank: bool = True  # no blank or end-of-text as the first token
    without_timestamps: bool = False  # decode text only (no timestamp tokens)
    max_initial_timestamp: Optional[float] = 1.0  # seconds: the first timestamp's upper bound
    # -- long-form loop
    initial_prompt: Optional[str] = None  # text the first window is conditioned on
    condition_on_previous_text: Optional[bool] = None  # see the class docstring
    compression_ratio_threshold: Optional[float] = 2.4  # fall back above this gzip ratio
    logprob_threshold: Optional[float] = -1.0  # fall back below this average log probability
    no_speech_threshold: Optional[float] = 0.6  # skip a window above this no-speech probability
    clip_timestamps: Union[str, tuple[float, ...]] = "0"  # "start,end,start,end..." in seconds
    # -- word timestamps (openai-whisper's names)
    word_timestamps: bool = False  # words with times from the cross-attention (Segment.words)
    prepend_punctuations: str = "\"'“¿([{-"  # merged into the word after them
    append_punctuations: str = "\"'.。,，!！?？:：”)]}、"  # merged into the word before them
    refine_word_timestamps: bool = True  # snap word edges to the audio's pauses (False: OpenAI's times)
    hallucination_silence_threshold: Optional[float] = None  # seconds; skip silences around hallucinations
    # -- speech detection (faster-whisper's names): only speech is decoded, times mapped back
    vad_filter: Optional[bool] = None  # None: the mode's default (sequential off, batched on)
    vad_parameters: Optional[VadOptions] = None  # None: faster-whisper's defaults for the mode
    # -- wjx's own
    stop_loops: bool = True  # end a sample once it repeats itself, and fall back
    mode: str = "sequential"  # or "batched": pauses shortened, windows decoded side by side
    batch_size: int = 8  # windows decoded together

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen
        if self.mode not in MODES:
            raise UsageError("--mode", f"must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.task not in TASKS:
            raise UsageError("--task", f"must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.language is not None:
            from whisperjax_cli.tokenizer import normalize_language

            set_("language", normalize_language(self.language))
        set_("temperature", self._temperatures())
        if self.condition_on_previous_text is None:
            set_("condition_on_previous_text", self.mode == "sequential")
        if self.vad_filter is None:
            set_("vad_filter", self.mode == "batched")
        set_("vad_parameters", self._vad_parameters())
        for name in ("best_of", "beam_size"):
            _check_int(getattr(self, name), name, optional=True, high=MAX_BATCH)
        _check_int(self.batch_size, "batch_size", high=MAX_BATCH)
        _check_int(self.sample_len, "sample_len", high=448)
        if self.patience is not None:
            _check_number(self.patience, "patience", low=0.0, open_low=True)
            if not self.beam_size:
                raise UsageError("--patience", "needs --beam-size (it is a beam search setting)")
        if self.length_penalty is not None:
            _check_number(self.length_penalty, "length_penalty")
        for name in ("compression_ratio_threshold", "logprob_threshold", "max_initial_timestamp"):
            if getattr(self, name) is not None:
                _check_number(getattr(self, name), name)
        if self.no_speech_threshold is not None:
            _check_number(self.no_speech_threshold, "no_speech_threshold", low=0.0, high=1.0)
        if self.max_initial_timestamp is not None and self.max_initial_timestamp < 0:
            raise UsageError("--max-initial-timestamp", f"must be >= 0, not {self.max_initial_timestamp}")
        set_("suppress_tokens", _suppress_tokens(self.suppress_tokens))
        self._check_words()
        set_("clip_timestamps", _clip_timestamps(self.clip_timestamps))

    def _temperatures(self) -> tuple[float, ...]:
        t = self.temperature
        if t is None:
            return (0.0,) if self.mode == "batched" else OPENAI_TEMPERATURES
        values = tuple(t) if isinstance(t, (list, tuple)) else (t,)
        if not values:
            raise UsageError("--temperature", "needs at least one value")
        return tuple(_check_temperature(v, "temperature") for v in values)

    def _check_words(self) -> None:
        for name in ("prepend_punctuations", "append_punctuations"):
            if not isinstance(getattr(self, name), str):
                raise UsageError(f"--{name.replace('_', '-')}", f"must be a string, not {getattr(self, name)!r}")
        threshold = self.hallucination_silence_threshold
        if threshold is not None:
            _check_number(threshold, "hallucination_silence_threshold", low=0.0, open_low=True)
            if not self.word_timestamps:
                raise UsageError("--hallucination-silence-threshold", "needs --word-timestamps")

    @property
    def word_options(self):
        """The :class:`~whisperjax_cli.timing.WordOptions` of these options (imports JAX)."""
        from whisperjax_cli.timing import WordOptions

        return WordOptions(self.prepend_punctuations, self.append_punctuations, refine=self.refine_word_timestamps)

    def _vad_parameters(self) -> VadOptions:
        """faster-whisper's: its defaults in sequential mode; in batched mode segments that fit
        a window (160 ms of silence ends one unless other options are given; at most 30 s)."""
        given = self.vad_parameters
        if given is not None and not isinstance(given, VadOptions):
            raise UsageError("vad_parameters", f"must be a VadOptions, not {type(given).__name__}")
        if self.mode == "batched":
            return batched_vad_options(given)
        return VadOptions() if given is None else given

    @property
    def temperatures(self) -> tuple[float, ...]:
        """The fallback ladder (``temperature`` is always a tuple once built)."""
        return self.temperature  # type: ignore[return-value]

    @classmethod
    def create(cls, options: Optional["TranscribeOptions"] = None, **overrides) -> "TranscribeOptions":
        """``options`` (or the defaults) with keyword ``overrides``; unknown names are usage errors.

        ``temperature_increment_on_fallback`` (openai-whisper's CLI name) turns a single
        ``temperature`` into its ladder (:func:`temperature_ladder`).
        """
        increment = overrides.pop("temperature_increment_on_fallback", None)
        unknown = sorted(set(overrides) - FIELD_NAMES)
        if unknown:
            raise UsageError(None, f"unknown option{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
        if increment is not None:
            t = overrides.get("temperature", 0.0 if options is None else None)
            if isinstance(t, (int, float)) and not isinstance(t, bool):
                overrides["temperature"] = temperature_ladder(t, increment)
        if options is None:
            return cls(**overrides)
        # Mode-dependent defaults are re-resolved when the mode changes, unless they differ from
        # the old mode's default (then they were chosen, and are kept).
        if "mode" in overrides and overrides["mode"] != options.mode:
            old = cls(mode=options.mode)
            for name in ("temperature", "condition_on_previous_text", "vad_filter", "vad_parameters"):
                if getattr(options, name) == getattr(old, name):
                    overrides.setdefault(name, None)
        return dataclasses.replace(options, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The options as plain values (for JSON output and logs)."""
        return dataclasses.asdict(self)


FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(TranscribeOptions))


def _check_int(value: Any, name: str, optional: bool = False, high: Optional[int] = None) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (high is not None and value > high):
        bound = f" and at most {high}" if high is not None else ""
        raise UsageError(f"--{name.replace('_', '-')}", f"must be a whole number of at least 1{bound}, not {value!r}")


def _check_number(value: Any, name: str, low: Optional[float] = None, high: Optional[float] = None,
                  open_low: bool = False) -> None:
    flag = f"--{name.replace('_', '-')}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(flag, f"must be a finite number, not {value!r}")
    if low is not None and (value < low or (open_low and value == low)):
        raise UsageError(flag, f"must be {'>' if open_low else '>='} {low}, not {value}")
    if high is not None and value > high:
        raise UsageError(flag, f"must be <= {high}, not {value}")


def _suppress_tokens(value) -> Union[str, tuple[int, ...]]:
    """A comma-separated string of token ids (``-1``: OpenAI's set) or a tuple of ids."""
    items = value.split(",") if isinstance(value, str) else list(value or ())
    try:
        ids = tuple(int(t) for t in items if str(t).strip())
    except ValueError:
        raise UsageError("--suppress-tokens", f"must be token ids separated by commas, not {value!r}") from None
    if any(t < -1 for t in ids):
        raise UsageError("--suppress-tokens", f"token ids are >= 0 (or -1), not {value!r}")
    return value if isinstance(value, str) else ids


def _clip_timestamps(value) -> Union[str, tuple[float, ...]]:
    """``"0"``, ``"10,20,40"`` or a sequence of seconds, checked to be finite and >= 0."""
    items = value.split(",") if isinstance(value, str) else list(value or ())
    try:
        seconds = [float(t) for t in items if str(t).strip()]
    except ValueError:
        raise UsageError("--clip-timestamps", f"must be seconds separated by commas, not {value!r}") from None
    if any(not math.isfinite(t) or t < 0 for t in seconds):
        raise UsageError("--clip-timestamps", f"must be finite seconds >= 0, not {value!r}")
    return value if isinstance(value, str) else tuple(seconds)


def options_from(options: Optional[TranscribeOptions] = None, overrides: Optional[Mapping[str, Any]] = None
                 ) -> TranscribeOptions:
    """The options a library call runs with: ``options`` and/or keyword ``overrides``."""
    if options is not None and not isinstance(options, TranscribeOptions):
        raise TypeError(f"options must be a TranscribeOptions, not {type(options).__name__}")
    return TranscribeOptions.create(options, **dict(overrides or {}))
