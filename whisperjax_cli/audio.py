"""Decode any audio input into the one form the model reads: 16 kHz mono float32.

Files are decoded with libsndfile (via ``soundfile``: wav, flac, ogg/vorbis/opus, mp3, aiff...)
and, for containers it does not know (m4a, mp4, webm, aac...), with an ``ffmpeg`` binary when one
is installed. Long files are read in blocks and resampled as a stream, so peak memory follows the
16 kHz mono result rather than the original file (a 1-hour 48 kHz stereo float decode is 1.4 GB;
the result is 230 MB).

Every failure is an :class:`~whisperjax_cli.errors.AudioError` whose message reads
``<file>: <what went wrong>`` on one line.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, Union

import numpy as np
import soundfile as sf
import soxr

from .errors import AudioError

SAMPLE_RATE = 16000
BLOCK_SECONDS = 30  # decode and resample this much of the original file at a time
# Sample rates a header may state: telephone 8 kHz (and old 2-4 kHz recordings) to 768 kHz
# studio rates. A header saying 1 Hz made a 96 KB WAV decode into 13 hours of audio.
MIN_RATE, MAX_RATE = 1000, 768_000
BLOCK_SAMPLES = 16 << 20  # samples (all channels) in one decoded block at most
HINT_LIMIT = 3600 * SAMPLE_RATE  # the output is preallocated up to an hour; past it, it grows as read

# Suffixes libsndfile decodes; for others a failed libsndfile open means "install ffmpeg".
SOUNDFILE_SUFFIXES = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".caf"}
)
# ffmpeg demuxers allowed for containers libsndfile does not read (m4a, webm, mkv, wma, aac...).
FFMPEG_FORMATS = ("matroska,webm,mov,mp4,m4a,3gp,3g2,mj2,aac,asf,wav,flac,mp3,ogg,aiff,caf,amr,au,w64,wv,ape,"
                  "mpegts,avi,flv")
# Formats whose header states the exact frame count, so reading fewer frames means truncation.
# (libsndfile estimates MP3 lengths, and clamps WAV lengths to the data present.)
_EXACT_LENGTH_FORMATS = frozenset({"FLAC", "AIFF", "CAF", "W64", "RF64"})

AudioSource = Union[str, "os.PathLike[str]", BinaryIO, np.ndarray]
Which = Callable[[str], Union[str, None]]


def load_audio(
    source: AudioSource,
    sample_rate: int | None = None,
    *,
    name: str | None = None,
    which: Which | None = None,
) -> np.ndarray:
    """Loads audio as 16 kHz mono float32 samples.

    Args:
        source: A file path, a binary file object (e.g. ``io.BytesIO(sys.stdin.buffer.read())``),
            or a numpy array of samples, 1-D or ``[samples, channels]``; integer arrays
            (int16, int32) are scaled to [-1, 1].
        sample_rate: The rate of an array ``source``; required for arrays, and an error for
            files, which carry their own rate.
        name: How to name a non-path source in error messages (default ``"<array>"``, or the
            file object's ``name``, else ``"<file object>"``); e.g. ``"<stdin>"``.
        which: Looks up the ffmpeg binary by name; defaults to :func:`shutil.which`. Tests pass
            ``lambda _: None`` to simulate a machine without ffmpeg.

    Returns:
        A 1-D float32 array of samples at :data:`SAMPLE_RATE`.

    Raises:
        AudioError: The input is missing, unreadable, not audio, corrupt or empty.
        ValueError: ``sample_rate`` is missing for an array, or given for a file.
    """
    which = shutil.which if which is None else which
    if isinstance(source, np.ndarray):
        if sample_rate is None:
            raise ValueError("load_audio: sample_rate is required for array input")
        subject = name or "<array>"
        if not MIN_RATE <= sample_rate <= MAX_RATE:
            raise AudioError(subject, f"implausible sample rate {sample_rate} Hz (expected {MIN_RATE}-{MAX_RATE})")
        blocks = _array_blocks(source, subject, sample_rate)
        audio = _resample_to_mono(blocks, sample_rate, source.shape[0], subject)
        if audio.size == 0:
            raise AudioError(subject, "contains no audio (0 samples)")
        return audio
    if sample_rate is not None:
        raise ValueError("load_audio: sample_rate is only for array input; files carry their own")
    if isinstance(source, (str, os.PathLike)):
        return _load_path(os.fspath(source), which)
    if not hasattr(source, "read"):
        kind = type(source).__name__
        raise TypeError(f"load_audio: expected a path, binary file object or array, got {kind}")
    return _load_file_object(source, name or _file_object_name(source), which)


def audio_duration(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Returns the duration in seconds of 1-D ``samples`` at ``sample_rate``."""
    return samples.shape[0] / sample_rate


def _load_path(path: str, which: Which) -> np.ndarray:
    """Decodes the file at ``path``; see :func:`load_audio`."""
    with _open_path(path) as file:
        if os.fstat(file.fileno()).st_size == 0:
            raise AudioError(path, "empty file (0 bytes)")
        snd, reason = _open_soundfile(file)
        if snd is not None:
            with snd:
                return _decode_soundfile(snd, path)
    # libsndfile does not know this container: hand the path to ffmpeg if there is one.
    suffix = os.path.splitext(path)[1].lower()
    ffmpeg = which("ffmpeg")
    if ffmpeg is None:
        raise AudioError(path, _undecodable_message(suffix, reason))
    # "file:" stops ffmpeg reading a name like "a:b.m4a" as protocol "a".
    return _run_ffmpeg(ffmpeg, "file:" + os.path.abspath(path), None, path)


def _load_file_object(file: BinaryIO, subject: str, which: Which) -> np.ndarray:
    """Decodes a binary file object; see :func:`load_audio`."""
    try:
        seekable = file.seekable()
    except (AttributeError, ValueError):
        seekable = False
    if not seekable:  # libsndfile seeks while probing formats, so buffer pipes in memory
        file = io.BytesIO(file.read())
    start = file.tell()
    if not file.read(1):
        raise AudioError(subject, "empty input (0 bytes)")
    file.seek(start)
    snd, reason = _open_soundfile(file)
    if snd is not None:
        with snd:
            return _decode_soundfile(snd, subject)
    ffmpeg = which("ffmpeg")
    if ffmpeg is None:
        raise AudioError(subject, _undecodable_message("", reason))
    file.seek(start)
    return _run_ffmpeg(ffmpeg, "pipe:0", file.read(), subject)


def _file_object_name(file: BinaryIO) -> str:
    """Names a file object for messages: its ``name`` if a string (``"<stdin>"``), else generic."""
    name = getattr(file, "name", None)
    return name if isinstance(name, str) and name else "<file object>"


def _open_path(path: str) -> BinaryIO:
    """Opens ``path`` for reading, turning OS errors into one-line AudioErrors."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise AudioError(path, "no such file") from None
    except IsADirectoryError:
        raise AudioError(path, "is a directory, not an audio file") from None
    except PermissionError:
        raise AudioError(path, "permission denied") from None
    except OSError as err:
        raise AudioError(path, f"cannot open: {err.strerror or err}") from None


def _open_soundfile(file: BinaryIO) -> tuple[sf.SoundFile | None, str]:
    """Opens ``file`` with libsndfile; returns ``(None, reason)`` if it is not a format it reads."""
    try:
        return sf.SoundFile(file), ""
    except (sf.SoundFileError, RuntimeError) as err:
        return None, _libsndfile_reason(err)


def _decode_soundfile(snd: sf.SoundFile, subject: str) -> np.ndarray:
    """Reads an open SoundFile block by block into 16 kHz mono float32."""
    if not MIN_RATE <= snd.samplerate <= MAX_RATE:
        raise AudioError(subject, f"implausible sample rate {snd.samplerate} Hz in its header "
                                  f"(expected {MIN_RATE}-{MAX_RATE}): corrupt header?")
    try:
        audio = _resample_to_mono(_soundfile_blocks(snd, subject), snd.samplerate, snd.frames, subject)
    except (sf.SoundFileError, RuntimeError) as err:
        # A decode error mid-file (e.g. a truncated flac): never return the partial audio.
        reason = _libsndfile_reason(err)
        raise AudioError(subject, f"corrupt or truncated audio ({reason})") from err
    if audio.size == 0:
        raise AudioError(subject, "contains no audio (0 samples)")
    return audio


def _soundfile_blocks(snd: sf.SoundFile, subject: str) -> Iterator[np.ndarray]:
    """Yields ``[frames, channels]`` float32 blocks of ``BLOCK_SECONDS`` from ``snd``.

    Raises:
        AudioError: Fewer frames came back than the header promised (truncated file).
    """
    n_read = 0
    # One reused buffer: soundfile then yields views instead of a fresh copy per block.
    # Its size is bounded whatever the header claims (1024 channels at 768 kHz: 16 M samples).
    frames = max(1, min(BLOCK_SECONDS * snd.samplerate, BLOCK_SAMPLES // max(1, snd.channels)))
    buffer = np.empty((frames, snd.channels), np.float32)
    for block in snd.blocks(out=buffer):
        n_read += block.shape[0]
        yield block
    if snd.format in _EXACT_LENGTH_FORMATS and n_read < snd.frames:
        raise AudioError(subject, f"truncated audio ({n_read} of {snd.frames} frames)")


def _array_blocks(array: np.ndarray, subject: str, sample_rate: int) -> Iterator[np.ndarray]:
    """Yields ``[frames, channels]`` float32 blocks of an in-memory array, scaling integers.

    Scaling block by block keeps the float copy of a large int16 array out of memory.
    """
    if array.ndim not in (1, 2) or (array.ndim == 2 and array.shape[1] == 0):
        shape = array.shape
        raise AudioError(subject, f"expected 1-D or [samples, channels] audio, got shape {shape}")
    # Signed PCM only: unsigned (8-bit wav) would also need its offset removed.
    if np.issubdtype(array.dtype, np.signedinteger):
        scale = np.float32(1.0 / (np.iinfo(array.dtype).max + 1))  # int16: 1/32768, as soundfile
    elif np.issubdtype(array.dtype, np.floating):
        scale = None
    else:
        raise AudioError(subject, f"unsupported sample type {array.dtype}")
    frames = array if array.ndim == 2 else array[:, None]  # [samples, channels]
    step = BLOCK_SECONDS * sample_rate
    for start in range(0, frames.shape[0], step):
        block = frames[start : start + step].astype(np.float32)
        yield block if scale is None else block * scale


def _resample_to_mono(blocks: Iterable[np.ndarray], sample_rate: int, n_frames: int, subject: str) -> np.ndarray:
    """Mixes ``[frames, channels]`` blocks to mono and resamples them as one stream to 16 kHz.

    Only one block of the original rate and channel count is alive at a time; soxr's stream
    state carries the filter history across block edges, so the result equals resampling the
    whole signal at once. ``n_frames`` (the input length, if known) sizes the output up front.
    """
    resampler = None
    if sample_rate != SAMPLE_RATE:
        resampler = soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
    size_hint = -(-max(n_frames, 0) * SAMPLE_RATE // sample_rate) + 16  # ceil, plus the filter's slack
    # A header's frame count is a claim: never allocate more than HINT_LIMIT on its word.
    return _collect(_mono_pieces(blocks, resampler, subject), min(size_hint, HINT_LIMIT))


def _mono_pieces(
    blocks: Iterable[np.ndarray], resampler: soxr.ResampleStream | None, subject: str
) -> Iterator[np.ndarray]:
    """Yields each block mixed to mono ``[frames]`` and, if ``resampler`` is given, resampled.

    Raises:
        AudioError: A sample is NaN or infinite (a float file the model would read as noise).
    """
    for block in blocks:
        if not np.isfinite(block).all():
            raise AudioError(subject, "contains non-finite samples (NaN or infinity)")
        mono = block.mean(axis=1, dtype=np.float32)  # [frames, channels] -> [frames]
        yield mono if resampler is None else resampler.resample_chunk(mono)
    if resampler is not None:
        # Flush the filter's tail: the last few output samples wait on input that never comes.
        yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)


def _collect(pieces: Iterable[np.ndarray], size_hint: int) -> np.ndarray:
    """Concatenates 1-D float32 ``pieces`` into one buffer of about ``size_hint`` samples.

    Filling a preallocated buffer, instead of concatenating a list, keeps the peak at one copy
    of the result; the hint is exact for files whose header states their length, and the
    buffer doubles when a hint (e.g. an MP3 estimate) falls short.
    """
    buffer = np.empty(max(size_hint, 0), np.float32)
    filled = 0
    for piece in pieces:
        if filled + piece.size > buffer.size:
            grown = np.empty(max(2 * buffer.size, filled + piece.size), np.float32)
            grown[:filled] = buffer[:filled]
            buffer = grown
        buffer[filled : filled + piece.size] = piece
        filled += piece.size
    # Hand back a view when the hint was close; copy to release a much larger buffer.
    return buffer[:filled] if buffer.size - filled <= 1024 else buffer[:filled].copy()


def _run_ffmpeg(ffmpeg: str, url: str, data: bytes | None, subject: str) -> np.ndarray:
    """Decodes ``url`` (a ``file:`` path, or ``pipe:0`` fed ``data``) to 16 kHz mono with ffmpeg."""
    # ffmpeg does the mixing and resampling itself; s16le on stdout is what OpenAI's loader reads.
    # Only local files and pipes, and only containers of one media stream: a playlist (HLS, concat)
    # would make ffmpeg open other files (or URLs) named inside an input it was handed.
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", "0",
           "-protocol_whitelist", "file,pipe", "-format_whitelist", FFMPEG_FORMATS, "-i", url,
           "-f", "s16le", "-ac", "1", "-ar", str(SAMPLE_RATE), "-"]  # fmt: skip
    if data is not None:
        cmd.remove("-nostdin")  # the input itself comes on stdin
    try:
        proc = subprocess.run(cmd, input=data, capture_output=True, check=False)
    except OSError as err:
        raise AudioError(subject, f"cannot run ffmpeg ({ffmpeg}): {err.strerror or err}") from None
    if proc.returncode != 0:
        raise AudioError(subject, f"ffmpeg cannot decode it: {_last_line(proc.stderr)}")
    pcm = proc.stdout[: len(proc.stdout) // 2 * 2]  # whole int16 samples only
    audio = np.frombuffer(pcm, np.int16).astype(np.float32) / np.float32(32768.0)
    if audio.size == 0:
        raise AudioError(subject, "contains no audio (0 samples)")
    return audio


def _undecodable_message(suffix: str, reason: str) -> str:
    """Explains why an input libsndfile rejected cannot be decoded without ffmpeg."""
    if suffix and suffix not in SOUNDFILE_SUFFIXES:
        return f"cannot decode '{suffix}' audio: install ffmpeg (not found on PATH)"
    if "not recognised" in reason.lower() or not reason:
        return "not an audio file (unrecognised format; ffmpeg, if installed, reads more formats)"
    return f"corrupt audio file ({reason})"


def _libsndfile_reason(err: Exception) -> str:
    """libsndfile's own one-line reason, without the file name soundfile prefixes."""
    reason = _last_line(getattr(err, "error_string", None) or str(err))
    return reason.removeprefix("Error :").strip().rstrip(".")


def _last_line(text: bytes | str) -> str:
    """The last non-blank line of ``text`` (ffmpeg puts the error there), or ``"unknown error"``."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"
