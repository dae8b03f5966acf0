"""Tests for whisperjax_cli.features: mel filterbank, log-mel parity with faster-whisper, shapes."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from faster_whisper.feature_extractor import FeatureExtractor

from whisperjax_cli.audio import SAMPLE_RATE, load_audio
from whisperjax_cli.features import (
    FRAMES_PER_SECOND,
    HOP_LENGTH,
    N_FFT,
    N_FRAMES,
    N_SAMPLES,
    LogMelWindows,
    hz_to_mel,
    log_mel_spectrogram,
    mel_filters,
    mel_to_hz,
    pad_or_trim,
)

DATA = pathlib.Path(__file__).parent / "data"
# Listed by name so that a missing clip fails instead of shrinking the parametrisation.
CLIPS = [
    "cards-001.flac", "cards-002.flac", "cards-003.flac", "cards-004.flac", "cards-005.flac",
    "forever-44k-stereo.flac", "forever.mp3", "forever.ogg", "goforward.flac", "numbers.flac",
    "russian-8k.wav", "something.wav",
]  # fmt: skip
MEL_TOLERANCE = 1e-4  # max abs difference allowed against faster-whisper's float32 numpy version


@pytest.fixture(scope="module")
def extractors() -> dict[int, FeatureExtractor]:
    return {n: FeatureExtractor(feature_size=n) for n in (80, 128)}


def test_clip_list_covers_every_clip_in_data():
    on_disk = sorted(p.name for p in DATA.iterdir() if p.name != "NOTICE")
    assert on_disk == sorted(CLIPS)


def test_constants_describe_a_30_second_window():
    assert (N_FFT, HOP_LENGTH, N_SAMPLES, N_FRAMES, FRAMES_PER_SECOND) == (400, 160, 480000, 3000, 100)


def test_slaney_mel_scale_hand_values():
    # Linear below 1 kHz at 200/3 Hz per mel, so 1 kHz is mel 15; log above, 27 mels per 6.4x.
    np.testing.assert_allclose(hz_to_mel(np.array([0.0, 200 / 3, 1000.0, 6400.0])), [0.0, 1.0, 15.0, 42.0])
    np.testing.assert_allclose(hz_to_mel(8000.0), 45.245640471924965)
    freqs = np.array([0.0, 500.0, 999.0, 1000.0, 1001.0, 4321.0, 8000.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(freqs)), freqs, rtol=1e-12)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_faster_whisper(n_mels, extractors):
    ours = mel_filters(n_mels)
    theirs = extractors[n_mels].mel_filters
    assert ours.shape == (n_mels, N_FFT // 2 + 1)
    assert ours.dtype == np.float32
    # faster-whisper rounds to float32 once, librosa (and we) twice: at most 1 ulp apart.
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=4e-9)


@pytest.mark.parametrize(
    ("n_mels", "band", "fft_bin", "expected"),
    [  # values read from OpenAI's whisper/assets/mel_filters.npz where faster-whisper is 1 ulp off
        (80, 3, 4, 0.018890129402279854),
        (80, 5, 5, 0.009954108856618404),
        (128, 8, 5, 0.023663168773055077),
        (128, 11, 7, 0.04168175160884857),
    ],
)
def test_mel_filters_are_bit_identical_to_openai(n_mels, band, fft_bin, expected):
    assert float(mel_filters(n_mels)[band, fft_bin]) == expected


def test_first_mel_band_by_hand():
    # 82 points evenly spaced in mels up to 8 kHz; the first ones are in the linear region.
    edge_hz = 45.245640471924965 / 81 * 200 / 3  # 37.24 Hz, then 74.48 Hz
    falling = (2 * edge_hz - 40.0) / edge_hz  # FFT bin 1 is 40 Hz, on the falling side
    row = mel_filters(80)[0]
    assert np.flatnonzero(row).tolist() == [1]
    np.testing.assert_allclose(row[1], falling * 2.0 / (2 * edge_hz), rtol=1e-6)


def test_mel_filters_are_cached_and_read_only():
    assert mel_filters(80) is mel_filters(80)
    with pytest.raises(ValueError):
        mel_filters(80)[0, 0] = 1.0


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("clip", CLIPS)
def test_log_mel_matches_faster_whisper(clip, n_mels, extractors):
    audio = load_audio(DATA / clip)
    # faster-whisper's __call__ appends `padding` zeros (160 by default); compare like with like.
    for padding in (0, HOP_LENGTH):
        ours = log_mel_spectrogram(audio, n_mels=n_mels, padding=padding)
        theirs = extractors[n_mels](audio, padding=padding).T  # theirs is [n_mels, frames]
        assert ours.shape == theirs.shape == ((audio.size + padding) // HOP_LENGTH, n_mels)
        assert ours.dtype == np.float32
        assert np.abs(ours - theirs).max() <= MEL_TOLERANCE


def test_log_mel_with_long_form_padding_matches_across_blocks(extractors):
    # 9.4 s + 30 s of zeros = 3937 frames: more than one 3000-frame block.
    audio = load_audio(DATA / "russian-8k.wav")
    ours = log_mel_spectrogram(audio, padding=N_SAMPLES)
    theirs = extractors[80](audio, padding=N_SAMPLES).T
    assert ours.shape == (3937, 80)
    assert np.abs(ours - theirs).max() <= MEL_TOLERANCE
    # Block size is a memory knob only; odd sizes exercise a partial last block.
    np.testing.assert_array_equal(log_mel_spectrogram(audio, padding=N_SAMPLES, block_frames=7), ours)


@pytest.mark.parametrize(
    ("n_samples", "padding", "frames"),
    [(16000, 0, 100), (16000, 160, 101), (16159, 0, 100), (16160, 0, 101), (159, 0, 0), (0, 480000, 3000)],
)
def test_frame_count_is_samples_over_hop(n_samples, padding, frames):
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, n_samples).astype(np.float32)
    assert log_mel_spectrogram(audio, n_mels=128, padding=padding).shape == (frames, 128)


def test_silence_is_the_floor_value():
    # Power 0 everywhere: log10(1e-10) = -10, the max is -10 too, so (x + 4) / 4 = -1.5.
    mel = log_mel_spectrogram(np.zeros(SAMPLE_RATE, np.float32))
    np.testing.assert_array_equal(mel, np.full((100, 80), -1.5, np.float32))


def test_dynamic_range_is_clamped_to_80_db():
    mel = log_mel_spectrogram(load_audio(DATA / "numbers.flac"))
    # max(x, x.max() - 8) on log10 power, then divided by 4: a range of exactly 2.
    np.testing.assert_allclose(mel.max() - mel.min(), 2.0, atol=1e-6)


def test_tone_peaks_in_the_band_centred_nearest_its_frequency():
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    mel = log_mel_spectrogram(0.5 * np.sin(2 * np.pi * 2500.0 * t).astype(np.float32))
    centres = mel_to_hz(np.linspace(0.0, hz_to_mel(8000.0), 82)[1:-1])  # [80] band centres
    expected = int(np.argmin(np.abs(centres - 2500.0)))
    assert (mel[10:-10].argmax(axis=1) == expected).all()


def test_pad_or_trim_along_frames():
    mel = np.arange(10, dtype=np.float32).reshape(5, 2)  # [frames, n_mels]
    np.testing.assert_array_equal(pad_or_trim(mel, 3), [[0, 1], [2, 3], [4, 5]])
    np.testing.assert_array_equal(pad_or_trim(mel, 7)[5:], np.zeros((2, 2)))
    np.testing.assert_array_equal(pad_or_trim(mel, 7)[:5], mel)
    assert pad_or_trim(mel, 5) is mel


def test_pad_or_trim_other_axis_and_default_length():
    mel = np.ones((4, 3), np.float32)
    np.testing.assert_array_equal(pad_or_trim(mel, 5, axis=1), [[1, 1, 1, 0, 0]] * 4)
    assert pad_or_trim(mel).shape == (N_FRAMES, 3)
    assert pad_or_trim(np.ones(N_SAMPLES + 5), N_SAMPLES).shape == (N_SAMPLES,)


@pytest.mark.parametrize("padding", [0, N_FFT - 1, N_SAMPLES])
def test_log_mel_windows_kept_from_the_peak_pass_equal_transformed_ones(padding):
    audio = np.random.default_rng(3).standard_normal(7 * SAMPLE_RATE + 77).astype(np.float32) * 0.1
    kept = LogMelWindows(audio, 80, padding=padding, block_frames=300)
    fresh = LogMelWindows(audio, 80, padding=padding, cache_bytes=0)
    assert kept._kept is not None and fresh._kept is None
    n = fresh.n_frames
    for start, stop in [(0, 3000), (0, n), (650, 700), (n - 10, n + 5), (kept._sounding - 3, n), (n, n), (5, 5)]:
        np.testing.assert_array_equal(kept.frames(start, stop), fresh.frames(start, stop))


@pytest.mark.parametrize("n_samples", [1, 159, 200, 201, 400, 3 * SAMPLE_RATE + 77])
@pytest.mark.parametrize("padding", [0, 40, N_FFT - 1, N_FFT, N_FFT + 1, N_SAMPLES])
def test_log_mel_windows_peak_skips_only_silent_frames(n_samples, padding):
    """The peak taken without transforming the frames wholly inside the padding is the peak
    over every frame (what start-up used to compute), and those frames are indeed all zeros."""
    audio = np.random.default_rng(n_samples).standard_normal(n_samples).astype(np.float32) * 0.1
    mel = LogMelWindows(audio, 80, padding=padding)
    blocks = [mel._log10(s, min(s + 1000, mel.n_frames)) for s in range(0, mel.n_frames, 1000)]
    every = max((float(b.max()) for b in blocks), default=-np.inf)
    assert mel.max == every
    sounding = mel._sounding_frames(padding)
    if padding >= N_SAMPLES:
        assert sounding == -(-(n_samples + N_FFT // 2) // HOP_LENGTH) < mel.n_frames
    if sounding < mel.n_frames:
        assert not mel._samples(sounding * HOP_LENGTH, (mel.n_frames - 1) * HOP_LENGTH + N_FFT).any()
