"""Spoken-language identification: one home for transcribe's language detection and for
``wjx classify``'s language scores.

A window's language probabilities are the softmax over the language tokens of the logits after
``<|startoftranscript|>`` (OpenAI's ``detect_language``). Windows are the log-mel of up to 30 s of
content zero-padded past its end (faster-whisper's ``detect_language(audio)``), after leading
silence is skipped; several windows are averaged, weighted by how much of each is sound.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import jax
import jax.numpy as jnp
import numpy as np

from whisperjax_cli.audio import SAMPLE_RATE, load_audio
from whisperjax_cli.decoding import encode
from whisperjax_cli.errors import UsageError
from whisperjax_cli.features import HOP_LENGTH, N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim
from whisperjax_cli.kv_cache import init_cache
from whisperjax_cli.programs import stored_jit

if TYPE_CHECKING:
    from whisperjax_cli.model import Whisper

Array = jax.Array
SILENCE_DB = 35.0  # a 10 ms frame is silent when this far below the file's loudest 100 ms
CONTEXT_SECONDS = 1.0  # kept before the first loud frame: short leading silences change nothing


@stored_jit(static_argnames=("module",))
def language_logits(module: Whisper, params, audio: Array, sot: Array) -> Array:
    """Logits after ``<|startoftranscript|>`` alone, ``[batch, vocab]`` (language ID)."""
    cross = module.apply({"params": params}, audio, method="cross_kv")
    cache = init_cache(module.dims, cross, 1, module.dtype)
    tokens = jnp.broadcast_to(sot, (audio.shape[0], 1)).astype(jnp.int32)
    logits, _ = module.apply({"params": params}, tokens, cache, jnp.int32(0), method="decode")
    return logits[:, 0]


def language_probs(logits: np.ndarray, language_tokens: np.ndarray) -> np.ndarray:
    """Softmax over the language tokens only, ``[batch, n_languages]`` (as OpenAI)."""
    sub = np.asarray(logits, np.float64)[:, language_tokens]
    sub = np.exp(sub - sub.max(axis=-1, keepdims=True))
    return sub / sub.sum(axis=-1, keepdims=True)


def detect_language_mel(model, mels: np.ndarray, keep_audio: bool = False):
    """Language probabilities ``[batch, n_languages]`` for mel windows ``[batch, 3000, n_mels]``:
    ``(codes, probs)``, and with ``keep_audio`` the windows' encoder output as a third item."""
    tok = model.tokenizer
    if not tok.multilingual:
        raise UsageError(model.name, "English-only model: it cannot identify languages")
    audio = encode(model.module, model.params, np.asarray(mels, np.float32))
    logits = np.asarray(language_logits(model.module, model.params, audio, np.int32(tok.sot)))
    probs = language_probs(logits, np.asarray(tok.all_language_tokens))
    return (tok.all_language_codes, probs, audio) if keep_audio else (tok.all_language_codes, probs)


def frame_db(audio: np.ndarray) -> np.ndarray:
    """Power in dB of each 10 ms frame, smoothed over 100 ms so clicks do not count, ``[frames]``."""
    n = audio.shape[0] // HOP_LENGTH
    power = np.square(audio[: n * HOP_LENGTH].reshape(n, HOP_LENGTH), dtype=np.float64).mean(axis=1)
    power = np.convolve(power, np.ones(10) / 10, mode="same")
    return 10.0 * np.log10(power + 1e-20)


def speech_start(audio: np.ndarray, threshold_db: float = SILENCE_DB, context: float = CONTEXT_SECONDS) -> int:
    """The sample where content begins: ``context`` seconds before the first frame within
    ``threshold_db`` of the loudest, so only long leading silences are skipped."""
    db = frame_db(audio)
    if db.size == 0:
        return 0
    first = int(np.argmax(db > db.max() - threshold_db))
    return max(0, first * HOP_LENGTH - int(context * SAMPLE_RATE))


VAD_LOOKAHEAD = 600  # seconds of audio searched for the first speech


def first_speech(audio: np.ndarray, context: float = CONTEXT_SECONDS) -> int:
    """The sample ``context`` seconds before the first speech Silero VAD finds in the first
    ``VAD_LOOKAHEAD`` seconds (faster-whisper's rules), else :func:`speech_start`'s."""
    from whisperjax_cli.vad import speech_timestamps

    speech = speech_timestamps(audio[: VAD_LOOKAHEAD * SAMPLE_RATE])
    if not speech:
        return speech_start(audio, context=context)
    return max(0, speech[0]["start"] - int(context * SAMPLE_RATE))


def language_windows(audio: np.ndarray, n_mels: int, windows: int = 1, skip_silence: bool = True):
    """Language-ID windows of 16 kHz ``audio`` and their weights.

    Each window is the log-mel of up to 30 s of content, zero-padded past its end (as
    faster-whisper's ``detect_language(audio)``). A window's weight is its count of non-silent
    frames, so a window that is mostly trailing silence counts little.

    With ``skip_silence``, the windows start ``CONTEXT_SECONDS`` before the first speech that
    Silero VAD finds (so leading music, noise or silence is skipped), or, when it finds none,
    before the first loud frame (:func:`speech_start`).

    Returns:
      ``(mels float32 [n, N_FRAMES, n_mels], weights float64 [n])``, ``1 <= n <= windows``.
    """
    start = first_speech(audio) if skip_silence else 0
    span = audio[start : start + windows * N_SAMPLES]
    mel = log_mel_spectrogram(span, n_mels, padding=HOP_LENGTH)[: windows * N_FRAMES]  # [frames, n_mels]
    n = max(1, math.ceil(mel.shape[0] / N_FRAMES))
    mels = pad_or_trim(mel, n * N_FRAMES).reshape(n, N_FRAMES, n_mels)
    db = frame_db(span)
    loud = pad_or_trim((db > db.max() - SILENCE_DB) if db.size else db, n * N_FRAMES)
    weights = loud.reshape(n, N_FRAMES).sum(axis=1).astype(np.float64)
    return mels, weights if weights.sum() > 0 else np.ones(n)


def detect_language(model, audio, sample_rate: Optional[int] = None, *, windows: int = 1, top_k: int = 5,
                    skip_silence: bool = True) -> list[tuple[str, float]]:
    """Spoken-language ID: the top-k ``(code, probability)`` of one input, best first.

    Leading silence is skipped (``skip_silence``) and the probabilities of up to ``windows``
    30 s windows of content are averaged, weighted by their sound. With one window and no
    skipped silence, this is faster-whisper's ``detect_language(audio)``.

    Args:
      model: a multilingual :class:`~whisperjax_cli.loading.WhisperModel`, or a name to load.
      audio: a path, a binary file object, or samples (16 kHz mono unless ``sample_rate``).
    Raises:
      UsageError: an English-only model, or ``windows`` < 1; AudioError: unreadable input.
    """
    if isinstance(model, str):
        from whisperjax_cli.loading import load_model

        model = load_model(model)
    if not hasattr(model, "tokenizer"):
        raise UsageError(model.name, "a classifier checkpoint, not a Whisper model: it cannot identify languages")
    if windows < 1:
        raise UsageError("--windows", f"must be at least 1, not {windows}")
    if isinstance(audio, np.ndarray) and sample_rate is None:
        samples = audio
    else:
        samples = load_audio(audio, sample_rate)
    mels, weights = language_windows(samples, model.n_mels, windows, skip_silence)
    codes, probs = detect_language_mel(model, mels)  # [windows, n_languages]
    mean = weights @ probs / weights.sum()
    order = np.argsort(-mean, kind="stable")[: max(1, top_k)]
    return [(codes[i], float(mean[i])) for i in order]
