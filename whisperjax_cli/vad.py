"""Speech detection: Silero VAD v6 probabilities and faster-whisper's speech timestamps.

One home for "where is someone speaking", used by transcription (``--vad``), language
identification and ``wjx vad``. The model is whisperjax_cli/vad_model.py (Flax, one
probability per 512-sample chunk of 16 kHz audio); this module feeds it many files at once in
bounded blocks and turns probabilities into speech segments exactly as faster-whisper's
``get_speech_timestamps`` does (same options, defaults and sample positions). The stitching
helpers (speech-only audio and the map back to original times) are in vad_stitch.py and
re-exported here.

JAX is imported only when probabilities are computed, so :class:`VadOptions` and the
timestamp rules load without it; Flax (vad_model.py) only when the block program is traced,
not when it is read back from disk (:mod:`whisperjax_cli.programs`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from whisperjax_cli.vad_options import VadOptions, batched_vad_options  # noqa: F401 - re-exported
from whisperjax_cli.vad_stitch import SpeechTimestampsMap, collect_chunks, speech_audio  # noqa: F401 - re-exported
from whisperjax_cli.vad_weights import CHUNK, CONTEXT, HIDDEN, SAMPLE_RATE
# Rows x chunks per model call. A block's intermediates (~40 MB at 2048) then stay near the
# caches: 4096 or more ran the 2-core EPYC about 2x slower per hour of audio, 1024 no faster.
MAX_BLOCK = 2048
MIN_BLOCK = 64  # the smallest chunk count a call is padded to (few compiled shapes)
SILENCE_AT_MAX_SPEECH = SAMPLE_RATE * 98 / 1000  # a silence this long may end a too-long segment

Speech = dict  # {"start": sample, "end": sample}, as faster-whisper's


def chunk_count(n_samples: int) -> int:
    """Probabilities for ``n_samples``: faster-whisper pads 1 to 512 zeros, so ``n // 512 + 1``."""
    return n_samples // CHUNK + 1


def _stream_block(audio: np.ndarray, count: int, start: int, chunks: int, out: np.ndarray) -> None:
    """Writes the samples the model reads for chunks ``start .. start + chunks`` into ``out``.

    That is ``out[:chunks * 512 + 64]`` = the 64 samples before chunk ``start`` and the chunks,
    from the stream faster-whisper's ``SileroVADModel`` builds: zeros before the audio, the
    audio padded with zeros to ``count`` chunks, and (its array view writes through) the last
    64 samples of the last chunk zeroed, which changes a file's last probabilities when its
    length is 449 to 511 past a multiple of 512.
    """
    first = start * CHUNK - CONTEXT  # audio index of out[0]
    valid = min(len(audio), count * CHUNK - CONTEXT)
    lo, hi = max(first, 0), min(first + out.shape[0], valid)
    out[:] = 0
    if hi > lo:
        out[lo - first: hi - first] = audio[lo:hi]


def _block_chunks(remaining: int, rows: int) -> int:
    """Chunks per model call: powers of two (few compiled shapes), rows x chunks <= MAX_BLOCK."""
    cap = max(MIN_BLOCK, MAX_BLOCK // (1 << (rows - 1).bit_length()))
    return min(cap, 1 << (max(remaining, MIN_BLOCK) - 1).bit_length())


def _run_block(params: dict, stream, h, c):
    from whisperjax_cli.vad_model import SileroVad

    probs, (h, c) = SileroVad().apply({"params": params}, stream, (h, c))
    return probs, h, c


@functools.lru_cache(maxsize=1)
def _block_program():
    from whisperjax_cli.programs import StoredJit

    return StoredJit(_run_block, ())  # one program per (batch, chunks) shape


def run_block(params: dict, stream, h, c):
    """The model over a block: ``stream`` ``[batch, chunks * 512 + 64]`` (see
    :class:`~whisperjax_cli.vad_model.SileroVad`), the LSTM state ``(h, c)`` carried in and out.
    Returns ``(probabilities [batch, chunks], h, c)``."""
    return _block_program()(params, stream, h, c)


def _group_probabilities(params: Any, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Probabilities of a few streams run side by side, block by block, the LSTM state carried.

    Blocks are dispatched without waiting for results (JAX runs them asynchronously), so the
    next block's samples are gathered while the model runs.
    """
    counts = [chunk_count(len(a)) for a in audios]
    h = c = np.zeros((len(audios), HIDDEN), np.float32)  # the LSTM state at the start of a stream
    pieces, start = [], 0
    while start < max(counts):
        chunks = _block_chunks(max(counts) - start, len(audios))
        # A new array per block: on CPU, JAX may read a numpy argument in place while the
        # (asynchronous) call runs, so a buffer reused for the next block could change under it.
        stream = np.empty((len(audios), chunks * CHUNK + CONTEXT), np.float32)  # [rows, samples]
        for row, (audio, count) in enumerate(zip(audios, counts)):
            _stream_block(audio, count, start, chunks, stream[row])
        probs, h, c = run_block(params, stream, h, c)
        pieces.append(probs)  # [rows, chunks]
        start += chunks
    probs = np.concatenate([np.asarray(p) for p in pieces], axis=1)  # [rows, >= max(counts)]
    return [probs[row, :count] for row, count in enumerate(counts)]


def speech_probabilities(
    audio: np.ndarray | Sequence[np.ndarray],
    *,
    lengths: Sequence[int] | None = None,
    params: Any = None,
    batch_size: int = 16,
) -> np.ndarray | list[np.ndarray]:
    """Silero's speech probability of every 512-sample chunk, as faster-whisper computes it.

    Args:
        audio: 16 kHz mono float32 samples: one 1-D array, a list of them, or a
            ``[batch, samples]`` array whose rows are ``lengths`` long.
        lengths: Valid samples per row of a 2-D ``audio`` (default: whole rows).
        params: Weights from :func:`whisperjax_cli.vad_weights.load_weights` (default: loaded
            from the package; pass them to save the read when calling often).
        batch_size: Files run side by side; longer files are grouped together.

    Returns:
        ``len // 512 + 1`` probabilities per file (float32): one array for a 1-D ``audio``,
        else a list in input order.
    """
    import jax

    from whisperjax_cli.vad_weights import load_weights

    single = isinstance(audio, np.ndarray) and audio.ndim == 1
    if single:
        audios = [audio]
    elif isinstance(audio, np.ndarray) and audio.ndim == 2:
        lengths = [audio.shape[1]] * audio.shape[0] if lengths is None else list(lengths)
        if len(lengths) != audio.shape[0] or not all(0 <= n <= audio.shape[1] for n in lengths):
            raise ValueError(f"speech_probabilities: lengths {lengths} do not fit audio {audio.shape}")
        audios = [row[:n] for row, n in zip(audio, lengths)]
    else:
        audios = list(audio)
    audios = [np.asarray(a, np.float32) for a in audios]
    params = jax.device_put(load_weights() if params is None else params)  # once, not per block
    order = sorted(range(len(audios)), key=lambda i: -len(audios[i]))  # similar lengths share calls
    results: list[np.ndarray | None] = [None] * len(audios)
    for first in range(0, len(order), batch_size):
        group = order[first: first + batch_size]
        for i, probs in zip(group, _group_probabilities(params, [audios[i] for i in group])):
            results[i] = probs
    return results[0] if single else results


def _find_speech(above: list, below: list, n_samples: int, min_speech: float, max_speech: float,
                 min_silence: float) -> list[Speech]:
    """faster-whisper's speech/silence state machine, step for step (its sample arithmetic).

    ``above[i]``: chunk ``i`` is speech (>= threshold); ``below[i]``: it is silence
    (< neg_threshold). Between the two a chunk continues whatever was going on. ``temp_end``
    is where a silence began; ``prev_end`` / ``next_start`` remember the last silence of more
    than 98 ms and the speech after it, where a segment longer than ``max_speech`` is split.
    """
    triggered, speeches, current = False, [], {}
    temp_end = prev_end = next_start = 0
    for i, (is_speech, is_silence) in enumerate(zip(above, below)):
        position = CHUNK * i
        if is_speech and temp_end:  # speech again: the silence did not last
            temp_end = 0
            if next_start < prev_end:
                next_start = position
        if is_speech and not triggered:
            triggered = True
            current["start"] = position
            continue
        if triggered and position - current["start"] > max_speech:  # too long: split
            if prev_end:  # at the last long-enough silence
                current["end"] = prev_end
                speeches.append(current)
                current = {}
                if next_start < prev_end:  # still in that silence
                    triggered = False
                else:
                    current["start"] = next_start
                prev_end = next_start = temp_end = 0
            else:  # no silence: cut here
                current["end"] = position
                speeches.append(current)
                current = {}
                prev_end = next_start = temp_end = 0
                triggered = False
                continue
        if is_silence and triggered:
            if not temp_end:
                temp_end = position
            if position - temp_end > SILENCE_AT_MAX_SPEECH:  # a place to split a long segment
                prev_end = temp_end
            if position - temp_end < min_silence:
                continue
            current["end"] = temp_end
            if current["end"] - current["start"] > min_speech:
                speeches.append(current)
            current = {}
            prev_end = next_start = temp_end = 0
            triggered = False
    if current and n_samples - current["start"] > min_speech:  # speech runs to the end
        current["end"] = n_samples
        speeches.append(current)
    return speeches


def _pad_speech(speeches: list[Speech], pad: float, n_samples: int) -> list[Speech]:
    """Widens each segment by ``pad`` samples, splitting a shorter gap between neighbours in two."""
    for i, speech in enumerate(speeches):
        if i == 0:
            speech["start"] = int(max(0, speech["start"] - pad))
        if i == len(speeches) - 1:
            speech["end"] = int(min(n_samples, speech["end"] + pad))
            continue
        following = speeches[i + 1]
        silence = following["start"] - speech["end"]
        if silence < 2 * pad:
            speech["end"] += int(silence // 2)
            following["start"] = int(max(0, following["start"] - silence // 2))
        else:
            speech["end"] = int(min(n_samples, speech["end"] + pad))
            following["start"] = int(max(0, following["start"] - pad))
    return speeches


def timestamps_from_probabilities(
    probs: np.ndarray, n_samples: int, options: VadOptions = VadOptions()
) -> list[Speech]:
    """Speech segments from chunk probabilities, as faster-whisper's ``get_speech_timestamps``.

    Args:
        probs: ``[chunks]`` float32 probabilities (:func:`speech_probabilities`); compared in
            float32 with the thresholds, as faster-whisper's numpy scalars are.
        n_samples: The audio's length in samples (segments end inside it).
        options: The timestamp options.

    Returns:
        ``[{"start": sample, "end": sample}, ...]`` in order, at 16 kHz.
    """
    probs = np.asarray(probs, np.float32)
    neg_threshold = options.neg_threshold
    if neg_threshold is None:
        neg_threshold = max(options.threshold - 0.15, 0.01)
    pad = SAMPLE_RATE * options.speech_pad_ms / 1000
    speeches = _find_speech(
        (probs >= options.threshold).tolist(),
        (probs < neg_threshold).tolist(),
        n_samples,
        min_speech=SAMPLE_RATE * options.min_speech_duration_ms / 1000,
        max_speech=SAMPLE_RATE * options.max_speech_duration_s - CHUNK - 2 * pad,
        min_silence=SAMPLE_RATE * options.min_silence_duration_ms / 1000,
    )
    return _pad_speech(speeches, pad, n_samples)


def speech_timestamps(audio: np.ndarray, options: VadOptions = VadOptions(), *, params: Any = None) -> list[Speech]:
    """Where someone speaks in one file: faster-whisper's ``get_speech_timestamps`` on our model.

    Args:
        audio: 16 kHz mono float32 samples, 1-D.
        options: The timestamp options.
        params: VAD weights (default: the package's).

    Returns:
        ``[{"start": sample, "end": sample}, ...]``: sample positions at 16 kHz, in order.
    """
    probs = speech_probabilities(np.asarray(audio, np.float32), params=params)
    return timestamps_from_probabilities(probs, len(audio), options)


def batch_speech_timestamps(
    audios: Sequence[np.ndarray],
    options: VadOptions = VadOptions(),
    *,
    params: Any = None,
    batch_size: int = 16,
) -> list[list[Speech]]:
    """:func:`speech_timestamps` of many files, the model run on ``batch_size`` of them at once.

    Returns:
        One list of segments per file, in input order; each equals what
        :func:`speech_timestamps` gives for that file alone.
    """
    audios = [np.asarray(a, np.float32) for a in audios]
    all_probs = speech_probabilities(audios, params=params, batch_size=batch_size)
    return [timestamps_from_probabilities(p, len(a), options) for p, a in zip(all_probs, audios)]
