"""OpenAI's audio API as ``wjx serve`` speaks it: request fields in, response shapes out.

The fields of ``POST /v1/audio/transcriptions`` and ``/v1/audio/translations`` become one
:class:`~whisperjax_cli.options.TranscribeOptions` (the key that decides which requests share a
batch) plus how to answer (:class:`RequestParams`); a :class:`~whisperjax_cli.results.Transcript`
becomes the body OpenAI would send for ``response_format`` json, text, srt, vtt or verbose_json,
or the server-sent events of ``stream=true``. Every failure is an :class:`ApiError`, whose body
is OpenAI's error object. No JAX here: this module only reads and writes plain values.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Optional

from whisperjax_cli.errors import UsageError
from whisperjax_cli.options import FIELD_NAMES, TranscribeOptions, temperature_ladder
from whisperjax_cli.results import Segment, Transcript
from whisperjax_cli.tokenizer import LANGUAGES
from whisperjax_cli.writers import get_writer, segment_dict

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
GRANULARITIES = ("segment", "word")
# OpenAI's temperature is where the fallback starts: "if set to 0, the model will use log
# probability to automatically increase the temperature" (openai-whisper's 0.2 steps).
FALLBACK_STEP = 0.2
SEGMENT_KEYS = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                "compression_ratio", "no_speech_prob")
# The fields of verbose_json that OpenAI's TranscriptionSegment has; words go to the top level.
WORDS_AVAILABLE = "word_timestamps" in FIELD_NAMES


class ApiError(Exception):
    """An HTTP error with OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Mapping[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class RequestParams:
    """One request, parsed: how to decode (``options``) and how to answer."""

    options: TranscribeOptions
    response_format: str
    segments: bool  # verbose_json: list segments (OpenAI's default granularity)
    words: bool  # verbose_json: list words (timestamp_granularities[]=word)
    stream: bool  # answer as server-sent events


def _one(fields: Mapping[str, list[str]], name: str) -> Optional[str]:
    values = fields.get(name)
    return values[0] if values else None


def parse_params(fields: Mapping[str, list[str]], task: str, tokenizer, base: TranscribeOptions) -> RequestParams:
    """The request's fields (``model`` is accepted whatever it says) as :class:`RequestParams`.

    Args:
      fields: the form's text fields, each name to its values in order.
      task: ``"transcribe"`` or ``"translate"`` (from the endpoint).
      tokenizer: the served model's, to refuse what it cannot do (another language or
        translation on an English-only model) before any work is queued.
      base: the server's options (batch size), which every request starts from.
    Raises:
      ApiError: 400 for any bad value, naming the field in ``param``.
    """
    fmt = (_one(fields, "response_format") or "json").strip()
    if fmt not in RESPONSE_FORMATS:
        raise ApiError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, not {fmt!r}",
                       param="response_format", code="invalid_value")
    granularities = [g.strip() for g in fields.get("timestamp_granularities[]", []) +
                     fields.get("timestamp_granularities", [])]
    for g in granularities:
        if g not in GRANULARITIES:
            raise ApiError(400, f"timestamp_granularities[] must be segment or word, not {g!r}",
                           param="timestamp_granularities", code="invalid_value")
    overrides: dict[str, Any] = {"task": task}
    if "word" in granularities:
        if fmt != "verbose_json":
            raise ApiError(400, "timestamp_granularities[]=word needs response_format=verbose_json",
                           param="timestamp_granularities", code="invalid_value")
        if not WORDS_AVAILABLE:
            raise ApiError(400, "word timestamps are not available in this version of wjx",
                           param="timestamp_granularities", code="unsupported_value")
        overrides["word_timestamps"] = True
    temperature = _one(fields, "temperature")
    if temperature is not None and temperature.strip():
        overrides["temperature"] = _temperature(temperature)
    prompt = _one(fields, "prompt")
    if prompt and prompt.strip():
        overrides["initial_prompt"] = prompt
    language = (_one(fields, "language") or "").strip()
    if language:
        overrides["language"] = language
    try:
        options = TranscribeOptions.create(base, **overrides)
        tokenizer.sot_sequence_for(options.language, options.task)  # what Transcriber checks
    except UsageError as err:
        # The options were checked one by one above, but for the language (and the task an
        # English-only model cannot do, which is the endpoint's, not a field's).
        param = None if "cannot translate" in err.message else "language"
        raise ApiError(400, err.message, param=param, code="invalid_value") from None
    return RequestParams(options, fmt, segments=not granularities or "segment" in granularities,
                         words="word" in granularities, stream=_flag(_one(fields, "stream"), "stream"))


def _temperature(text: str) -> tuple[float, ...]:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ApiError(400, f"temperature must be a number from 0 to 1, not {text!r}",
                       param="temperature", code="invalid_value")
    return temperature_ladder(value, FALLBACK_STEP)


def _flag(text: Optional[str], name: str) -> bool:
    value = (text or "false").strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise ApiError(400, f"{name} must be true or false, not {text!r}", param=name, code="invalid_value")
    return value in ("true", "1")


# ---------------------------------------------------------------- responses


def language_name(code: Optional[str]) -> str:
    """OpenAI's ``language``: the English name, lower case (``"english"``)."""
    return LANGUAGES.get(code or "", code or "")


def verbose_json(transcript: Transcript, params: RequestParams) -> dict:
    """OpenAI's verbose_json: task, language, duration, text, segments, words (when asked)."""
    out: dict[str, Any] = {
        "task": params.options.task,
        "language": language_name(transcript.language),
        "duration": transcript.duration,
        "text": transcript.text.strip(),
    }
    if params.segments:
        out["segments"] = [openai_segment(s) for s in transcript.segments]
    if params.words:
        out["words"] = [{"word": w.word.strip(), "start": round(w.start, 3), "end": round(w.end, 3)}
                        for s in transcript.segments for w in (s.words or [])]
    return out


def openai_segment(segment: Segment) -> dict:
    """A segment with OpenAI's keys only (times cleaned, non-finite numbers as null)."""
    full = segment_dict(segment)
    return {key: full[key] for key in SEGMENT_KEYS}


def render(transcript: Transcript, params: RequestParams) -> tuple[str, str]:
    """``(body, media type)`` of the answer in ``params.response_format``."""
    fmt = params.response_format
    if fmt == "json":
        return _dumps({"text": transcript.text.strip()}), "application/json"
    if fmt == "verbose_json":
        return _dumps(verbose_json(transcript, params)), "application/json"
    if fmt == "text":
        return transcript.text.strip() + "\n", "text/plain; charset=utf-8"
    return get_writer(fmt).render(transcript), "text/plain; charset=utf-8"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def sse(data: dict) -> str:
    """One server-sent event carrying ``data`` as JSON (the form the openai client reads)."""
    return f"data: {_dumps(data)}\n\n"


def delta_events(segments: list[Segment], first: bool) -> list[str]:
    """One ``transcript.text.delta`` per segment; the deltas join into the final text.

    Each also carries ``segment`` (OpenAI's segment keys, with times), which the openai client
    keeps as an extra field of its event object.
    """
    out = []
    for i, s in enumerate(segments):
        text = s.text.lstrip() if first and i == 0 else s.text
        out.append(sse({"type": "transcript.text.delta", "delta": text, "segment": openai_segment(s)}))
    return out


def done_event(transcript: Transcript, params: RequestParams) -> str:
    """``transcript.text.done`` with the whole text, plus language and duration (extra fields)."""
    return sse({"type": "transcript.text.done", "text": transcript.text.strip(),
                "language": language_name(transcript.language), "duration": transcript.duration})
