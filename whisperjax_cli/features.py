"""Whisper's log-mel spectrogram in numpy, time-major (``[frames, n_mels]``) for NWC convolutions.

Numerically this is OpenAI's ``whisper.audio.log_mel_spectrogram`` (and faster-whisper's
``FeatureExtractor``): a centred, reflect-padded STFT with a periodic Hann window, the power
spectrum without its last frame, a Slaney mel filterbank (librosa's), ``log10`` clamped at 1e-10,
a floor 8 (i.e. 80 dB) below the maximum, then ``(x + 4) / 4``.
"""

from __future__ import annotations

import functools

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .audio import SAMPLE_RATE

N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop
CHUNK_LENGTH = 30  # seconds of audio per model window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples per window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames per window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100
BLOCK_FRAMES = 3000  # STFT frames computed at once: bounds the float64 temporaries to ~10 MB
MEL_CACHE_BYTES = 64 << 20  # a file's log-mel is kept from the peak pass when it fits (~16 min)

# Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above (27 mels per 6.4x).
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # 15 mels
_LOGSTEP = np.log(6.4) / 27.0


def hz_to_mel(freqs: np.ndarray) -> np.ndarray:
    """Converts frequencies in Hz to Slaney mels (librosa's ``hz_to_mel(htk=False)``)."""
    freqs = np.asarray(freqs, dtype=np.float64)
    log_part = _MIN_LOG_MEL + np.log(np.maximum(freqs, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(freqs >= _MIN_LOG_HZ, log_part, freqs / _F_SP)


def mel_to_hz(mels: np.ndarray) -> np.ndarray:
    """Converts Slaney mels to Hz; the inverse of :func:`hz_to_mel`."""
    mels = np.asarray(mels, dtype=np.float64)
    log_part = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(mels, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(mels >= _MIN_LOG_MEL, log_part, mels * _F_SP)


@functools.lru_cache(maxsize=None)
def mel_filters(n_mels: int) -> np.ndarray:
    """Builds the Slaney-normalised mel filterbank Whisper was trained with.

    Equal to ``librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels, htk=False,
    norm="slaney")``, the source of OpenAI's ``mel_filters.npz``: triangles between
    consecutive mel-spaced points from 0 Hz to 8 kHz, each scaled to unit area in Hz.

    Args:
        n_mels: Number of mel bands: 80 (Whisper v1/v2) or 128 (large-v3).

    Returns:
        A read-only float32 array ``[n_mels, N_FFT // 2 + 1]`` (cached per ``n_mels``).
    """
    fft_freqs = np.fft.rfftfreq(N_FFT, d=1.0 / SAMPLE_RATE)  # [201] bin centres, 0..8000 Hz
    mel_points = np.linspace(hz_to_mel(0.0), hz_to_mel(SAMPLE_RATE / 2), n_mels + 2)
    edges = mel_to_hz(mel_points)  # [n_mels + 2]: band i rises on edges[i:i+2], falls on [i+1:i+3]
    widths = np.diff(edges)  # [n_mels + 1]
    ramps = edges[:, None] - fft_freqs[None, :]  # [n_mels + 2, 201]
    rising = -ramps[:-2] / widths[:-1, None]  # [n_mels, 201]
    falling = ramps[2:] / widths[1:, None]  # [n_mels, 201]
    # librosa stores the triangles as float32 before scaling them; rounding twice the same way
    # makes this bit-identical to OpenAI's mel_filters.npz (rounding once differs by 1 ulp).
    filters = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    # Slaney normalisation: divide by half the band's width so every triangle has the same area.
    filters *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    filters.flags.writeable = False  # shared by the cache
    return filters


def log_mel_spectrogram(
    audio: np.ndarray,
    n_mels: int = 80,
    padding: int = 0,
    *,
    block_frames: int = BLOCK_FRAMES,
) -> np.ndarray:
    """Computes Whisper's normalised log-mel spectrogram, time-major.

    Args:
        audio: 1-D samples at 16 kHz (float; use :func:`~whisperjax_cli.audio.load_audio`).
        n_mels: Number of mel bands (80 or 128).
        padding: Zero samples appended before the STFT; long-form transcription appends
            ``N_SAMPLES`` so the last window is complete, as OpenAI does.
        block_frames: Frames transformed per vectorised step; only changes peak memory.

    Returns:
        float32 ``[(len(audio) + padding) // HOP_LENGTH, n_mels]``: 100 frames per second,
        values in ``[max - 2, max]`` with ``max <= 4 / 4 + log10(peak power) / 4``.
    """
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"log_mel_spectrogram: expected 1-D audio, got shape {audio.shape}")
    if padding:
        audio = np.pad(audio, (0, padding))
    # A centred STFT has 1 + len // hop frames; Whisper drops the last one.
    n_frames = audio.shape[0] // HOP_LENGTH
    if n_frames == 0:
        return np.zeros((0, n_mels), np.float32)
    padded = np.pad(audio, N_FFT // 2, mode="reflect")  # [samples + N_FFT]
    frames = sliding_window_view(padded, N_FFT)[::HOP_LENGTH][:n_frames]  # [n_frames, N_FFT] view
    filters_t = mel_filters(n_mels).T.astype(np.float64)  # [N_FFT // 2 + 1, n_mels]
    window = _periodic_hann(N_FFT)
    log_spec = np.empty((n_frames, n_mels), np.float32)
    for start in range(0, n_frames, block_frames):
        stop = min(start + block_frames, n_frames)
        log_spec[start:stop] = _log_mel_block(frames[start:stop], window, filters_t)
    # The floor depends on the global maximum, so it waits until every block is done.
    np.maximum(log_spec, log_spec.max() - 8.0, out=log_spec)
    log_spec += 4.0
    log_spec /= 4.0
    return log_spec


def pad_or_trim(array: np.ndarray, length: int = N_FRAMES, axis: int = 0) -> np.ndarray:
    """Zero-pads or cuts ``array`` to ``length`` along ``axis`` (frames of a mel, or samples).

    Args:
        array: e.g. a mel ``[frames, n_mels]`` or 1-D samples.
        length: Target size of ``axis``; ``N_FRAMES`` is one 30 s model window.
        axis: The axis to fit.

    Returns:
        An array with ``shape[axis] == length``; the input itself when it already fits.
    """
    size = array.shape[axis]
    if size > length:
        index = [slice(None)] * array.ndim
        index[axis] = slice(0, length)
        return array[tuple(index)]
    if size < length:
        widths = [(0, 0)] * array.ndim
        widths[axis] = (0, length - size)
        return np.pad(array, widths)
    return array


def _periodic_hann(size: int) -> np.ndarray:
    """Periodic Hann window (``torch.hann_window(size)``), float64 ``[size]``."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(size) / size)


def _log_mel_block(frames: np.ndarray, window: np.ndarray, filters_t: np.ndarray) -> np.ndarray:
    """``log10`` mel power of ``[frames, N_FFT]`` samples, in float64, as ``[frames, n_mels]``.

    float64 keeps quiet bins next to loud ones exact; the float32 reference differs by ~1e-6.
    """
    spectrum = np.fft.rfft(frames * window, axis=-1)  # [frames, N_FFT // 2 + 1] complex128
    power = spectrum.real**2 + spectrum.imag**2
    return np.log10(np.maximum(power @ filters_t, 1e-10))  # [frames, n_mels]


class LogMelWindows:
    """Windows of a long signal's log-mel, computed on demand in bounded memory.

    Equal to slicing ``log_mel_spectrogram(audio, n_mels, padding)`` (frames ``[start, stop)``)
    without holding the whole spectrogram: a first pass finds the global maximum that the
    normalisation needs, then each request transforms only its own samples. Memory stays
    proportional to the audio itself, not to the audio plus its spectrogram.
    """

    def __init__(self, audio: np.ndarray, n_mels: int = 80, padding: int = 0, *, block_frames: int = BLOCK_FRAMES,
                 cache_bytes: int = MEL_CACHE_BYTES):
        self.audio = np.asarray(audio, dtype=np.float32)
        self.n_mels = n_mels
        self.total = self.audio.shape[0] + padding  # samples, zero padding included
        self.n_frames = self.total // HOP_LENGTH
        self._filters_t = mel_filters(n_mels).T.astype(np.float64)
        self._window = _periodic_hann(N_FFT)
        # Frames that lie wholly in the zero padding (30 s of them after a short clip) all come
        # out at the value of a silent frame: that value is taken once, not per frame.
        sounding = self._sounding_frames(padding)
        # A short file keeps the peak pass's log-mel (a constant cap, not growing with the hours):
        # its windows are then slices instead of a second transform of every frame.
        keep = sounding * n_mels * 8 <= cache_bytes
        peak, blocks = -np.inf, []
        for start in range(0, sounding, block_frames):
            block = self._log10(start, min(start + block_frames, sounding))
            peak = max(peak, float(block.max(initial=-np.inf)))
            if keep:
                blocks.append(block)
        self._silent = _log_mel_block(np.zeros((1, N_FFT)), self._window, self._filters_t)  # [1, n_mels]
        if sounding < self.n_frames:
            peak = max(peak, float(self._silent.max()))
        self.max = peak
        self._sounding = sounding
        self._kept = np.concatenate(blocks) if keep and blocks else None

    def _sounding_frames(self, padding: int) -> int:
        """How many leading frames may touch the audio; every later one is all zeros.

        Frame ``i`` reads samples ``i * HOP - N_FFT/2`` to ``i * HOP + N_FFT/2 - 1``; past the
        audio's end those are zeros, and with at least ``N_FFT`` samples of padding the
        reflection at the very end maps into the zeros too.
        """
        if padding < N_FFT:
            return self.n_frames
        first_silent = -(-(self.audio.shape[0] + N_FFT // 2) // HOP_LENGTH)  # ceil
        return min(self.n_frames, first_silent)

    def _samples(self, lo: int, hi: int) -> np.ndarray:
        """Samples ``[lo, hi)`` of the centred signal: reflect-padded by N_FFT // 2 at both
        ends of ``audio`` followed by zeros up to ``total``."""
        half = N_FFT // 2
        idx = np.arange(lo, hi) - half  # positions in the unpadded signal
        idx = np.where(idx < 0, -idx, idx)  # reflection at the start
        end = self.total - 1
        idx = np.where(idx > end, 2 * end - idx, idx)  # reflection at the end
        n = self.audio.shape[0]
        return np.where(idx < n, self.audio[np.clip(idx, 0, n - 1)], 0.0).astype(np.float32)

    def _log10(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros((0, self.n_mels))
        samples = self._samples(start * HOP_LENGTH, (stop - 1) * HOP_LENGTH + N_FFT)
        frames = sliding_window_view(samples, N_FFT)[::HOP_LENGTH][: stop - start]
        return _log_mel_block(frames, self._window, self._filters_t)

    def frames(self, start: int, stop: int) -> np.ndarray:
        """Normalised log-mel frames ``[start, stop)`` as float32 ``[stop - start, n_mels]``."""
        stop = min(stop, self.n_frames)
        if self._kept is not None and stop > start:  # the kept frames, then silent ones (all zeros)
            cut = min(max(start, self._sounding), stop)
            log10 = np.concatenate([self._kept[start:cut], np.repeat(self._silent, stop - cut, axis=0)])
        else:
            log10 = self._log10(start, stop)
        log_spec = np.maximum(log10, self.max - 8.0)
        return ((log_spec + 4.0) / 4.0).astype(np.float32)


def model_window(mel: LogMelWindows, start: int, n: int) -> np.ndarray:
    """Frames ``[start, start + n)`` of ``mel``, zero-padded to one model window ``[N_FRAMES, n_mels]``."""
    window = np.zeros((N_FRAMES, mel.n_mels), np.float32)
    if n > 0:
        window[:n] = mel.frames(start, start + n)
    return window


def first_window(mel: LogMelWindows, content_frames: int, language_id: bool) -> np.ndarray:
    """The first window a transcription encodes, ``[N_FRAMES, n_mels]``.

    With ``language_id``, the language-ID window: the content and one frame more, zeros after
    (faster-whisper's window, which keeps the frame centred on the last sample); otherwise the
    first decoding window. ``wjx transcribe`` encodes it ahead while the model loads.
    """
    return model_window(mel, 0, min(N_FRAMES, content_frames + 1 if language_id else content_frames))
