"""Tests for whisperjax_cli.audio: formats, inputs, block-wise resampling and one-line errors."""

from __future__ import annotations

import builtins
import io
import os
import pathlib
import shutil
import stat
import sys
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import soxr

from whisperjax_cli import audio as audio_module
from whisperjax_cli.audio import SAMPLE_RATE, audio_duration, load_audio
from whisperjax_cli.errors import AudioError

DATA = pathlib.Path(__file__).parent / "data"
# Durations from each file's header (frames / rate), listed by hand so a wrong length fails.
CLIP_SECONDS = {
    "cards-001.flac": 1.095375,
    "cards-002.flac": 1.96025,
    "cards-003.flac": 1.5381875,
    "cards-004.flac": 1.554,
    "cards-005.flac": 3.5025,
    "forever-44k-stereo.flac": 5.76,
    "forever.mp3": 3.456,
    "forever.ogg": 3.3498125,
    "goforward.flac": 2.78625,
    "numbers.flac": 4.0231875,
    "russian-8k.wav": 9.375,
    "something.wav": 2.9986875,
}

def no_ffmpeg(_name: str) -> None:
    """A ``which`` that finds nothing: a machine without ffmpeg."""
    return None


def best_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Peak normalised cross-correlation of two signals over all lags (via FFT)."""
    n = a.size + b.size
    corr = np.fft.irfft(np.fft.rfft(a, n) * np.conj(np.fft.rfft(b, n)), n)
    return float(np.abs(corr).max() / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_one_line_error(err: pytest.ExceptionInfo, subject: str, *fragments: str) -> None:
    """The message is ``<subject>: ...`` on one line and mentions every fragment."""
    text = str(err.value)
    assert text.startswith(f"{subject}: "), text
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text, text


# --- every clip, every format ---------------------------------------------------------------


def test_clip_list_covers_every_clip_in_data():
    assert sorted(p.name for p in DATA.iterdir() if p.name != "NOTICE") == sorted(CLIP_SECONDS)


@pytest.mark.parametrize("clip", sorted(CLIP_SECONDS))
def test_clip_loads_as_16k_mono_float32(clip):
    samples = load_audio(DATA / clip)
    assert samples.dtype == np.float32
    assert samples.ndim == 1
    assert abs(audio_duration(samples) - CLIP_SECONDS[clip]) < 1e-3
    assert np.isfinite(samples).all()
    assert 0.05 < np.abs(samples).max() <= 1.0  # speech, not silence, and not rescaled


def test_16k_mono_flac_is_decoded_without_resampling():
    samples = load_audio(DATA / "numbers.flac")
    pcm = samples * 32768.0
    np.testing.assert_array_equal(pcm, np.round(pcm))  # still exactly the 16-bit samples
    np.testing.assert_array_equal(samples, sf.read(DATA / "numbers.flac", dtype="float32")[0])


def test_44k_stereo_is_mixed_to_mono_then_resampled():
    stereo, rate = sf.read(DATA / "forever-44k-stereo.flac", dtype="float32")  # [frames, 2]
    assert (rate, stereo.shape[1]) == (44100, 2)
    expected = soxr.resample(stereo.mean(axis=1), rate, SAMPLE_RATE, quality="HQ")
    samples = load_audio(DATA / "forever-44k-stereo.flac")
    assert samples.shape == (92160,)  # 5.76 s at 16 kHz
    np.testing.assert_allclose(samples, expected, atol=1e-6)


def test_mp3_and_ogg_of_one_recording_agree():
    # Both encode the same 16 kHz take; they differ by encoder delay and padding only.
    # (forever-44k-stereo.flac is a different, slower take: 5.76 s, correlation ~0.07.)
    mp3 = load_audio(DATA / "forever.mp3")
    ogg = load_audio(DATA / "forever.ogg")
    assert abs(audio_duration(mp3) - audio_duration(ogg)) < 0.15
    assert best_correlation(mp3, ogg) > 0.95


def test_8k_wav_is_upsampled_to_twice_the_samples():
    assert load_audio(DATA / "russian-8k.wav").shape == (2 * 75000,)


# --- other kinds of input --------------------------------------------------------------------


def test_array_at_8k_is_resampled_to_a_16k_sine():
    t8 = np.arange(8000) / 8000
    samples = load_audio(0.5 * np.sin(2 * np.pi * 440.0 * t8), sample_rate=8000)
    expected = 0.5 * np.sin(2 * np.pi * 440.0 * np.arange(16000) / 16000)
    assert samples.shape == (16000,) and samples.dtype == np.float32
    # Away from the edges, where the filter sees the implicit zeros beyond the signal.
    np.testing.assert_allclose(samples[400:-400], expected[400:-400], atol=2e-3)


def test_array_input_matches_decoding_the_file():
    pcm, rate = sf.read(DATA / "russian-8k.wav", dtype="int16")
    from_array = load_audio(pcm, sample_rate=rate)
    np.testing.assert_allclose(from_array, load_audio(DATA / "russian-8k.wav"), atol=1e-6)


def test_int16_array_is_scaled_to_unit_range():
    pcm = np.array([0, 16384, -32768, 32767, -8192], np.int16)
    np.testing.assert_array_equal(load_audio(pcm, 16000), [0.0, 0.5, -1.0, 32767 / 32768, -0.25])


def test_int16_stereo_array_is_mixed_to_mono():
    pcm = np.array([[16384, -16384], [8192, 8192], [-32768, 0]], np.int16)  # [samples, channels]
    np.testing.assert_array_equal(load_audio(pcm, 16000), [0.0, 0.25, -0.5])


def test_float64_array_comes_back_float32():
    samples = load_audio(np.array([0.25, -0.125]), 16000)
    assert samples.dtype == np.float32
    np.testing.assert_array_equal(samples, [0.25, -0.125])


def test_file_object_decodes_like_the_path():
    data = (DATA / "forever.ogg").read_bytes()
    np.testing.assert_array_equal(load_audio(io.BytesIO(data)), load_audio(DATA / "forever.ogg"))


class _Pipe(io.RawIOBase):
    """A non-seekable byte stream, like ``sys.stdin.buffer`` reading from a pipe."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._data.readinto(buffer)


def test_non_seekable_stream_is_buffered_and_decoded():
    data = (DATA / "cards-001.flac").read_bytes()
    stream = io.BufferedReader(_Pipe(data))
    assert not stream.seekable()
    np.testing.assert_array_equal(load_audio(stream), load_audio(DATA / "cards-001.flac"))


def test_array_needs_a_sample_rate_and_files_refuse_one():
    with pytest.raises(ValueError, match="sample_rate"):
        load_audio(np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="sample_rate"):
        load_audio(DATA / "numbers.flac", sample_rate=16000)


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.zeros(0, np.float32), "contains no audio"),
        (np.zeros((4, 2, 2), np.float32), "shape (4, 2, 2)"),
        (np.zeros((4, 0), np.float32), "shape (4, 0)"),
        (np.zeros(4, np.uint8), "unsupported sample type uint8"),
        (np.array(["a", "b"]), "unsupported sample type"),
    ],
)
def test_bad_arrays_raise_audio_error(array, fragment):
    with pytest.raises(AudioError) as err:
        load_audio(array, 16000)
    assert_one_line_error(err, "<array>", fragment)


# --- the error matrix ------------------------------------------------------------------------


def _missing(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "missing.wav"


def _directory(tmp_path: pathlib.Path) -> pathlib.Path:
    (tmp_path / "folder.wav").mkdir()
    return tmp_path / "folder.wav"


def _text_as_wav(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "notes.wav"
    path.write_text("these are not samples\n" * 50)
    return path


def _empty(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "empty.flac"
    path.write_bytes(b"")
    return path


def _zero_length_wav(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros(0, np.float32), SAMPLE_RATE)
    assert path.stat().st_size > 0  # a real header, just no frames
    return path


def _truncated_flac(tmp_path: pathlib.Path) -> pathlib.Path:
    data = (DATA / "numbers.flac").read_bytes()
    path = tmp_path / "truncated.flac"
    path.write_bytes(data[: len(data) // 2])
    return path


def _m4a(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "talk.m4a"
    path.write_bytes(b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00M4A mp42isom" + bytes(64))
    return path


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (_missing, "no such file"),
        (_directory, "is a directory"),
        (_text_as_wav, "not an audio file"),
        (_empty, "empty file"),
        (_zero_length_wav, "contains no audio"),
        (_truncated_flac, "corrupt or truncated audio"),
        (_m4a, "cannot decode '.m4a' audio: install ffmpeg"),
    ],
)
def test_bad_file_raises_one_line_audio_error(tmp_path, make, fragment):
    path = make(tmp_path)
    with pytest.raises(AudioError) as err:
        load_audio(path, which=no_ffmpeg)
    assert_one_line_error(err, str(path), fragment)


def test_missing_ffmpeg_is_looked_up_when_called(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(AudioError) as err:
        load_audio(_m4a(tmp_path))
    assert_one_line_error(err, str(tmp_path / "talk.m4a"), "ffmpeg")


def test_unreadable_file_says_permission_denied(tmp_path, monkeypatch):
    path = tmp_path / "locked.wav"
    path.write_bytes((DATA / "something.wav").read_bytes())
    real_open = builtins.open

    def deny(file, *args, **kwargs):  # what the kernel answers for a mode-000 file (non-root)
        if os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert_one_line_error(err, str(path), "permission denied")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads mode-000 files")
def test_mode_000_file_says_permission_denied(tmp_path):
    path = tmp_path / "locked.wav"
    path.write_bytes((DATA / "something.wav").read_bytes())
    path.chmod(0)
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert_one_line_error(err, str(path), "permission denied")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty input"),
        (b"plain text, not audio\n" * 20, "not an audio file"),
        ((DATA / "numbers.flac").read_bytes()[:30000], "corrupt or truncated audio"),
    ],
)
def test_bad_file_object_names_stdin(data, fragment):
    with pytest.raises(AudioError) as err:
        load_audio(io.BytesIO(data), name="<stdin>", which=no_ffmpeg)
    assert_one_line_error(err, "<stdin>", fragment)
    with pytest.raises(AudioError) as err:
        load_audio(io.BytesIO(data), which=no_ffmpeg)
    assert_one_line_error(err, "<file object>", fragment)


def test_header_promising_more_frames_than_decoded_is_truncation():
    class ShortFlac:  # what a flac cut at a frame boundary looks like to the reader
        samplerate, channels, format, frames = 16000, 1, "FLAC", 48000

        def blocks(self, out):
            yield out[:16000]

    with pytest.raises(AudioError) as err:
        list(audio_module._soundfile_blocks(ShortFlac(), "cut.flac"))
    assert_one_line_error(err, "cut.flac", "truncated audio (16000 of 48000 frames)")


# --- ffmpeg fallback, with a stand-in binary -------------------------------------------------

FAKE_FFMPEG = """#!{python}
# Stand-in for ffmpeg: checks the arguments, then treats the input as s16le already.
import sys
args = sys.argv[1:]
if args[-7:] != ["-f", "s16le", "-ac", "1", "-ar", "16000", "-"] or "-i" not in args:
    sys.exit("bad arguments: " + " ".join(args))
url = args[args.index("-i") + 1]
data = sys.stdin.buffer.read() if url == "pipe:0" else open(url[len("file:"):], "rb").read()
if data.startswith(b"FAIL"):
    sys.exit("[mov,mp4] banner line\\n" + data.decode().strip())
sys.stdout.buffer.write(data)
"""
FAKE_SAMPLES = np.array([1000, -1000, 12345, -12345, 0, 4660], np.int16)  # no bytes libsndfile sniffs


@pytest.fixture
def fake_ffmpeg(tmp_path):
    path = tmp_path / "bin" / "ffmpeg"
    path.parent.mkdir()
    path.write_text(FAKE_FFMPEG.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return lambda name: str(path) if name == "ffmpeg" else None


def test_unknown_container_path_is_decoded_by_ffmpeg(tmp_path, fake_ffmpeg):
    path = tmp_path / "clip.m4a"
    path.write_bytes(FAKE_SAMPLES.tobytes())
    np.testing.assert_array_equal(load_audio(path, which=fake_ffmpeg), FAKE_SAMPLES / 32768.0)


def test_unknown_container_file_object_is_piped_to_ffmpeg(fake_ffmpeg):
    samples = load_audio(io.BytesIO(FAKE_SAMPLES.tobytes()), which=fake_ffmpeg)
    np.testing.assert_array_equal(samples, FAKE_SAMPLES / 32768.0)


def test_ffmpeg_failure_reports_its_last_line(tmp_path, fake_ffmpeg):
    path = tmp_path / "broken.webm"
    path.write_bytes(b"FAIL moov atom not found")
    with pytest.raises(AudioError) as err:
        load_audio(path, which=fake_ffmpeg)
    assert_one_line_error(err, str(path), "ffmpeg cannot decode it: FAIL moov atom not found")


def test_ffmpeg_producing_nothing_is_no_audio(tmp_path, fake_ffmpeg):
    path = tmp_path / "silent.aac"
    path.write_bytes(b"\x01")  # one byte: ffmpeg "decodes" it to half a sample, i.e. none
    with pytest.raises(AudioError) as err:
        load_audio(path, which=fake_ffmpeg)
    assert_one_line_error(err, str(path), "contains no audio")


def test_missing_ffmpeg_binary_is_an_audio_error(tmp_path):
    path = _m4a(tmp_path)
    with pytest.raises(AudioError) as err:
        load_audio(path, which=lambda name: str(tmp_path / "no-such-ffmpeg"))
    assert_one_line_error(err, str(path), "cannot run ffmpeg")


# --- long files: block-wise decoding ---------------------------------------------------------


def test_long_file_is_read_in_blocks_and_matches_whole_resampling(tmp_path):
    rate, seconds = 44100, 300
    path = tmp_path / "long.wav"
    with sf.SoundFile(path, "w", samplerate=rate, channels=2, subtype="PCM_16") as out:
        for start in range(0, seconds * rate, 30 * rate):  # write 30 s at a time
            t = np.arange(start, start + 30 * rate) / rate
            left = 0.3 * np.sin(2 * np.pi * (220 + 50 * np.sin(2 * np.pi * 0.1 * t)) * t)
            right = 0.3 * np.sin(2 * np.pi * 3000 * t + 1.0)
            out.write(np.stack([left, right], axis=1))  # [frames, 2]
    pcm, _ = sf.read(path, dtype="float32")  # the reference, decoded whole
    expected = soxr.resample(pcm.mean(axis=1), rate, SAMPLE_RATE, quality="HQ")
    del pcm

    tracemalloc.start()
    try:
        samples = load_audio(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert samples.shape == (seconds * SAMPLE_RATE,)
    np.testing.assert_allclose(samples, expected, atol=1e-6)
    # Decoding the whole file as float32 stereo would take 5.5x the 16 kHz mono result alone.
    assert peak < 3 * samples.nbytes, f"peak {peak / 1e6:.0f} MB for a {samples.nbytes / 1e6:.0f} MB result"
