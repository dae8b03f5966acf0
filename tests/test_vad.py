"""Silero VAD v6 in JAX and faster-whisper's speech timestamps (whisperjax_cli/vad*.py, cli_vad.py).

The oracle is faster-whisper itself: its ``SileroVADModel`` (onnxruntime on its own
``assets/silero_vad_v6.onnx``) for per-chunk probabilities, its ``get_speech_timestamps``,
``collect_chunks`` and ``SpeechTimestampsMap`` for the rules, all on the very samples we use.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from pathlib import Path

import faster_whisper.vad as fw
import jax
import numpy as np
import pytest
from click.testing import CliRunner
from faster_whisper.utils import get_assets_path

from whisperjax_cli import vad, vad_model, vad_weights
from whisperjax_cli.audio import load_audio
from whisperjax_cli.cli_vad import vad as vad_command
from whisperjax_cli.errors import ModelError, UsageError

DATA = Path(__file__).parent / "data"
CLIPS = sorted(p for p in DATA.iterdir() if p.suffix in (".flac", ".wav", ".mp3", ".ogg"))
ONNX = Path(get_assets_path()) / "silero_vad_v6.onnx"
SR = 16000
# Option sets the parity tests run: defaults, faster-whisper's batched ones, and short limits
# that make every rule fire (splits at silences and hard cuts, dropped short speech, overlaps).
OPTION_SETS = [
    vad.VadOptions(),
    vad.batched_vad_options(),
    vad.VadOptions(min_silence_duration_ms=100, speech_pad_ms=30, min_speech_duration_ms=250),
    vad.VadOptions(threshold=0.3, max_speech_duration_s=2.5, min_silence_duration_ms=300, speech_pad_ms=200),
    vad.VadOptions(threshold=0.7, neg_threshold=0.6, max_speech_duration_s=1.0, min_silence_duration_ms=0,
                   speech_pad_ms=0),
]


@pytest.fixture(scope="module")
def params():
    return vad_weights.load_weights()


@pytest.fixture(scope="module")
def clips():
    return {p.name: load_audio(p) for p in CLIPS}


def onnx_probabilities(audio: np.ndarray) -> np.ndarray:
    """faster-whisper's probabilities, called exactly as its get_speech_timestamps calls them."""
    padded = np.pad(audio, (0, 512 - audio.shape[0] % 512))
    return fw.get_vad_model()(padded)


def fw_options(options: vad.VadOptions) -> fw.VadOptions:
    return fw.VadOptions(**dataclasses.asdict(options))


def noisy_audio(clips: dict, seconds: float, seed: int) -> np.ndarray:
    """Speech clips at random gains between silence, white and pink noise, tones and crackle."""
    rng = np.random.default_rng(seed)
    speech = list(clips.values())
    parts, total = [], 0
    while total < seconds * SR:
        n = int(rng.uniform(0.1, 6.0) * SR)
        kind, t = rng.integers(5), np.arange(n) / SR
        if kind == 0:
            gap = np.zeros(n)
        elif kind == 1:
            gap = rng.standard_normal(n) * rng.uniform(0.001, 0.1)
        elif kind == 2:
            spectrum = np.fft.rfft(rng.standard_normal(n)) / np.sqrt(np.maximum(np.arange(n // 2 + 1), 1))
            gap = np.fft.irfft(spectrum, n) * rng.uniform(0.5, 5.0)
        elif kind == 3:
            gap = np.sin(2 * np.pi * rng.uniform(80, 5000) * t) * rng.uniform(0.01, 0.5)
        else:
            gap = np.zeros(n)
            gap[rng.integers(0, n, n // 500 + 1)] = rng.uniform(-1, 1, n // 500 + 1)
        clip = speech[rng.integers(len(speech))] * rng.uniform(0.2, 1.5)
        if rng.random() < 0.3:  # speech over noise
            clip = clip + rng.standard_normal(clip.size) * 0.02
        parts += [clip, gap]
        total += clip.size + n
    return np.clip(np.concatenate(parts)[: int(seconds * SR)], -1, 1).astype(np.float32)


@pytest.fixture(scope="module")
def long_noisy(clips):
    return noisy_audio(clips, 150, seed=7)


# ---------------------------------------------------------------- weights


def test_shipped_weights_load_without_pickle(monkeypatch):
    """The shipped file is safetensors: loading must not touch pickle or numpy's pickle path."""
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading VAD weights")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(np, "load", refuse)
    raw = vad_weights.WEIGHTS_PATH.read_bytes()
    header = json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])  # safetensors: length + JSON header
    assert header["__metadata__"]["license"] == "MIT, Copyright (c) Silero Team"
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F32"}
    params = vad_weights.load_weights()
    shapes = {f"{m}/{k}": v.shape for m, leaves in params.items() for k, v in leaves.items()}
    assert shapes == vad_weights.parameter_shapes()
    assert (vad_weights.WEIGHTS_PATH.parent / "SILERO_VAD_LICENSE").read_text().count("Silero Team") >= 2


def test_shipped_weights_are_the_onnx_conversion(tmp_path):
    """convert_onnx on faster-whisper's graph rebuilds the shipped file tensor for tensor."""
    from safetensors.numpy import load_file

    out = tmp_path / "vad.safetensors"
    vad_weights.convert_onnx(ONNX, out)
    fresh, shipped = load_file(str(out)), load_file(str(vad_weights.WEIGHTS_PATH))
    assert sorted(fresh) == sorted(shipped)
    for name in fresh:
        np.testing.assert_array_equal(fresh[name], shipped[name], err_msg=name)


def test_strict_loading_names_what_is_wrong(tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(vad_weights.WEIGHTS_PATH))
    cases = {
        "no tensor decoder.rnn.weight_hh": {k: v for k, v in tensors.items() if k != "decoder.rnn.weight_hh"},
        "encoder.conv_layers.2.weight has shape": {
            **tensors, "encoder.conv_layers.2.weight": np.zeros((64, 64, 5), np.float32)},
        "unexpected tensor extra": {**tensors, "extra": np.zeros(3, np.float32)},
    }
    for expected, bad in cases.items():
        path = tmp_path / "bad.safetensors"
        save_file(bad, str(path))
        with pytest.raises(ModelError, match=expected):
            vad_weights.load_weights(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="cannot read VAD weights"):
        vad_weights.load_weights(tmp_path / "junk.safetensors")
    with pytest.raises(ModelError, match="cannot read VAD weights"):
        vad_weights.load_weights(tmp_path / "missing.safetensors")


def test_parameter_shapes_are_what_the_model_initialises():
    """The shape table loading checks against (no tracing at load) is the traced Flax init's."""
    stream = jax.ShapeDtypeStruct((1, 512 + 64), np.float32)
    state = jax.ShapeDtypeStruct((1, 128), np.float32)
    shapes = jax.eval_shape(lambda s, h: vad_model.SileroVad().init(jax.random.key(0), s, (h, h)), stream, state)
    flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    assert {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat} == vad_weights.parameter_shapes()


def test_block_shapes_without_weights():
    shapes = {k: jax.ShapeDtypeStruct(v, np.float32) for k, v in vad_weights.parameter_shapes().items()}
    params = {}
    for path, shape in shapes.items():
        module, leaf = path.split("/")
        params.setdefault(module, {})[leaf] = shape
    state = jax.ShapeDtypeStruct((3, 128), np.float32)
    stream = jax.ShapeDtypeStruct((3, 40 * 512 + 64), np.float32)
    probs, h, c = jax.eval_shape(vad.run_block, params, stream, state, state)
    assert (probs.shape, h.shape, c.shape) == ((3, 40), (3, 128), (3, 128))


def test_stft_front_end_is_the_graphs_reflect_pad_and_strided_conv(params):
    """Frames 1..4 of Pad(reflect, 128 | 128) then Conv(stride 128), computed the slow way."""
    chunks = np.random.default_rng(0).standard_normal((5, 576)).astype(np.float32)
    basis = params["stft"]["basis"]  # [256, 258]
    padded = np.pad(chunks, [(0, 0), (128, 128)], mode="reflect")  # [5, 832]
    frames = np.stack([padded[:, 128 * k: 128 * k + 256] for k in range(1, 5)], axis=1)  # [5, 4, 256]
    spectrum = frames.astype(np.float64) @ basis
    expected = np.sqrt(spectrum[..., :129] ** 2 + spectrum[..., 129:] ** 2)
    got = vad_model.StftMagnitude().apply({"params": params["stft"]}, chunks)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- parity with faster-whisper


def test_clips_match_onnxruntime_and_faster_whisper(clips, params):
    for name, audio in clips.items():
        ours = vad.speech_probabilities(audio, params=params)
        theirs = onnx_probabilities(audio)
        assert ours.shape == theirs.shape, name
        assert np.abs(ours - theirs).max() < 1e-3, name
        assert theirs.max() > 0.9 and theirs.min() < 0.1, name  # speech and pauses: not two flat lines
        for options in OPTION_SETS:
            expected = fw.get_speech_timestamps(audio, fw_options(options))
            assert vad.timestamps_from_probabilities(ours, len(audio), options) == expected, (name, options)
    assert vad.speech_timestamps(clips["goforward.flac"], params=params) == \
        fw.get_speech_timestamps(clips["goforward.flac"])


def test_long_noisy_audio_matches(long_noisy, params):
    """150 s over several model calls (the LSTM state carried between them), every rule firing."""
    ours = vad.speech_probabilities(long_noisy, params=params)
    theirs = onnx_probabilities(long_noisy)
    assert ours.shape == theirs.shape == (len(long_noisy) // 512 + 1,)
    assert len(ours) > 2 * vad.MAX_BLOCK
    assert np.abs(ours - theirs).max() < 1e-3
    counts = []
    for options in OPTION_SETS:
        got = vad.timestamps_from_probabilities(ours, len(long_noisy), options)
        assert got == fw.get_speech_timestamps(long_noisy, fw_options(options)), options
        counts.append(len(got))
    assert min(counts) >= 5 and max(counts) > min(counts)


@pytest.mark.parametrize("extra", [0, 1, 100, 447, 448, 449, 500, 511])
def test_lengths_around_the_last_chunk(clips, params, extra):
    """faster-whisper zeroes the last 64 samples of the last chunk; lengths 449..511 past 512k see it."""
    audio = np.concatenate([clips["cards-001.flac"], clips["numbers.flac"]])[: 512 * 40 + extra]
    audio[-600:] = np.random.default_rng(extra).standard_normal(600) * 0.3  # loud to the end
    ours = vad.speech_probabilities(audio, params=params)
    theirs = onnx_probabilities(audio)
    assert np.abs(ours - theirs).max() < 1e-3


def test_short_and_empty_audio(params):
    for n in (0, 1, 300, 512):
        audio = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
        ours = vad.speech_probabilities(audio, params=params)
        assert np.abs(ours - onnx_probabilities(audio)).max() < 1e-3, n
        assert vad.timestamps_from_probabilities(ours, n) == fw.get_speech_timestamps(audio)


# ---------------------------------------------------------------- batching


def test_batched_equals_one_at_a_time(clips, long_noisy, params):
    audios = [long_noisy[: 70 * SR], *clips.values(), long_noisy[10 * SR: 12 * SR], np.zeros(10, np.float32)]
    alone = [vad.speech_probabilities(a, params=params) for a in audios]
    together = vad.speech_probabilities(audios, params=params, batch_size=5)
    for a, b in zip(alone, together):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=2e-5)
    options = vad.VadOptions(min_silence_duration_ms=200, speech_pad_ms=50)
    assert vad.batch_speech_timestamps(audios, options, params=params, batch_size=4) == [
        vad.timestamps_from_probabilities(p, len(a), options) for p, a in zip(alone, audios)]

    lengths = [len(a) for a in audios[1:4]]
    matrix = np.zeros((3, max(lengths) + 1000), np.float32)  # [batch, samples], rows padded with zeros
    for row, a in zip(matrix, audios[1:4]):
        row[: len(a)] = a
    for a, b in zip(alone[1:4], vad.speech_probabilities(matrix, lengths=lengths, params=params)):
        np.testing.assert_allclose(a, b, atol=2e-5)


# ---------------------------------------------------------------- timestamp rules on scripted probabilities


def scripted_probabilities(rng: np.random.Generator, options: vad.VadOptions) -> np.ndarray:
    """Runs of speech, silence and in-between chunks, from 1 chunk to several seconds long;
    some chunks sit exactly on a threshold (compared in float32, as faster-whisper does)."""
    neg = options.neg_threshold if options.neg_threshold is not None else max(options.threshold - 0.15, 0.01)
    runs = []
    for _ in range(rng.integers(1, 40)):
        low, high = [(0.0, 0.2), (0.8, 1.0), (0.2, 0.8), (0.3, 0.55)][rng.integers(4)]
        length = rng.integers(1, 9) if rng.random() < 0.5 else rng.integers(1, 250)
        run = rng.uniform(low, high, length)
        if rng.random() < 0.2:
            run = rng.choice([options.threshold, neg], length)
        runs.append(run)
    return np.concatenate(runs).astype(np.float32)


def random_options(rng: np.random.Generator) -> vad.VadOptions:
    """Options whose sample counts often land on whole chunks (32 ms), so that the rules'
    strict and non-strict comparisons are put to the test, and on odd values too."""
    threshold = float(rng.choice([0.5, 0.1, rng.uniform(0.2, 0.9)]))  # 0.1: neg_threshold's floor
    return vad.VadOptions(
        threshold=threshold,
        neg_threshold=None if rng.random() < 0.5 else float(rng.uniform(0.01, threshold)),
        min_speech_duration_ms=int(rng.choice([0, 32, 96, 100, 256, 1000])),
        max_speech_duration_s=float(rng.choice([math.inf, 30, 1.056, 2.08, rng.uniform(0.5, 6)])),
        min_silence_duration_ms=int(rng.choice([0, 32, 64, 100, 160, 500, 2000])),
        speech_pad_ms=int(rng.choice([0, 16, 30, 48, 200, 400])),
    )


def test_timestamp_rules_match_faster_whisper(monkeypatch):
    rng = np.random.default_rng(2024)
    scripted = {}

    class Scripted:  # stands in for faster-whisper's ONNX model
        def __call__(self, padded):
            assert len(padded) // 512 == len(scripted["probs"])
            return scripted["probs"]

    monkeypatch.setattr(fw, "get_vad_model", lambda: Scripted())
    splits = 0
    for case in range(600):
        options = random_options(rng)
        probs = scripted_probabilities(rng, options)
        n_samples = (len(probs) - 1) * 512 + int(rng.choice([0, rng.integers(0, 512)]))
        scripted["probs"] = probs
        expected = fw.get_speech_timestamps(np.zeros(n_samples, np.float32), fw_options(options))
        got = vad.timestamps_from_probabilities(probs, n_samples, options)
        assert got == expected, (case, options)
        splits += len(got) > 1 and options.max_speech_duration_s < 6
    assert splits > 20


# ---------------------------------------------------------------- options


def test_options_mirror_faster_whisper():
    ours = [(f.name, f.default) for f in dataclasses.fields(vad.VadOptions)]
    theirs = [(f.name, f.default) for f in dataclasses.fields(fw.VadOptions)]
    assert ours == theirs
    with pytest.raises(dataclasses.FrozenInstanceError):
        vad.VadOptions().threshold = 0.2
    assert vad.batched_vad_options(vad.VadOptions(speech_pad_ms=10)) == vad.VadOptions(
        speech_pad_ms=10, max_speech_duration_s=30)


@pytest.mark.parametrize("bad", [
    {"threshold": 0}, {"threshold": 1}, {"threshold": -0.1}, {"threshold": 1.5}, {"threshold": math.nan},
    {"threshold": "0.5"}, {"threshold": True}, {"neg_threshold": 0.0}, {"neg_threshold": 0.6},
    {"neg_threshold": math.nan}, {"min_speech_duration_ms": -1}, {"min_silence_duration_ms": -0.5},
    {"speech_pad_ms": -400}, {"speech_pad_ms": math.inf}, {"max_speech_duration_s": 0},
    {"max_speech_duration_s": -3}, {"max_speech_duration_s": math.nan}, {"min_silence_duration_ms": math.nan},
])
def test_bad_options_are_usage_errors(bad):
    with pytest.raises(UsageError) as caught:
        vad.VadOptions(**bad)
    assert caught.value.subject is None and next(iter(bad)) in caught.value.message


def test_good_options_pass():
    vad.VadOptions(threshold=0.01, neg_threshold=0.01, min_speech_duration_ms=0, max_speech_duration_s=0.1,
                   min_silence_duration_ms=0, speech_pad_ms=0)


# ---------------------------------------------------------------- stitching


def test_stitching_matches_faster_whisper(long_noisy, params):
    audio = long_noisy
    chunks = vad.speech_timestamps(audio, vad.batched_vad_options(), params=params)
    assert len(chunks) > 5
    for max_duration in (math.inf, 30, 8):
        ours, ours_meta = vad.collect_chunks(audio, chunks, max_duration=max_duration)
        theirs, theirs_meta = fw.collect_chunks(audio, chunks, max_duration=max_duration)
        assert len(ours) == len(theirs)
        for a, b, m, n in zip(ours, theirs, ours_meta, theirs_meta):
            np.testing.assert_array_equal(a, b)
            assert (m["offset"], m["duration"]) == (n["offset"], n["duration"])
        # faster-whisper's metadata drops the first chunk of each later piece; ours lists all
        assert [c for m in ours_meta for c in m["segments"]] == chunks
    np.testing.assert_array_equal(vad.speech_audio(audio, chunks), np.concatenate(fw.collect_chunks(audio, chunks)[0]))
    ours_map, theirs_map = vad.SpeechTimestampsMap(chunks, SR), fw.SpeechTimestampsMap(chunks, SR)
    joined = sum(c["end"] - c["start"] for c in chunks) / SR
    times = [*np.random.default_rng(1).uniform(0, joined, 300), *(m.chunk_end_sample[0] / SR for m in [ours_map])]
    for t in times:
        for is_end in (False, True):
            assert ours_map.get_original_time(t, is_end=is_end) == theirs_map.get_original_time(t, is_end=is_end)
            assert ours_map.get_chunk_index(t, is_end) == theirs_map.get_chunk_index(t, is_end)
    assert vad.collect_chunks(audio, [])[1] == fw.collect_chunks(audio, [])[1]
    whole_seconds = [{"start": s * SR, "end": (s + 1) * SR} for s in range(0, 20, 2)]  # pieces fill exactly
    for max_duration in (1, 2, 3.5):
        ours = vad.collect_chunks(audio, whole_seconds, max_duration=max_duration)[1]
        theirs = fw.collect_chunks(audio, whole_seconds, max_duration=max_duration)[1]
        assert [(m["offset"], m["duration"]) for m in ours] == [(m["offset"], m["duration"]) for m in theirs]
    with pytest.raises(ValueError, match="no speech"):
        vad.SpeechTimestampsMap([], SR).get_original_time(1.0)


# ---------------------------------------------------------------- wjx vad


def test_cli_tsv_json_and_errors(clips, params, tmp_path):
    runner = CliRunner()
    go, cards = DATA / "goforward.flac", DATA / "cards-002.flac"
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really")
    args = ["--vad-min-silence-ms", "100", "--vad-speech-pad-ms", "30"]
    options = vad.VadOptions(min_silence_duration_ms=100, speech_pad_ms=30)

    result = runner.invoke(vad_command, [str(go), str(tmp_path / "missing.wav"), str(bad), str(cards), *args])
    assert result.exit_code == 1
    expected = ["file\tstart\tend"]
    for path in (go, cards):
        for s in vad.speech_timestamps(clips[path.name], options, params=params):
            expected.append(f"{path}\t{s['start'] / SR:.3f}\t{s['end'] / SR:.3f}")
    assert result.stdout.splitlines() == expected and len(expected) > 3
    errors = result.stderr.splitlines()
    assert errors[0] == f"wjx: {tmp_path / 'missing.wav'}: no such file"
    assert errors[1].startswith(f"wjx: {bad}: ") and len(errors) == 2

    result = runner.invoke(vad_command, ["-f", "json", str(cards), *args])
    assert result.exit_code == 0 and result.stderr == ""
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    speeches = vad.speech_timestamps(clips[cards.name], options, params=params)
    assert rows == [{"file": str(cards), "start": round(s["start"] / SR, 3), "end": round(s["end"] / SR, 3)}
                    for s in speeches]

    for usage in (["--vad-threshold", "1.5", str(cards)], ["--vad-min-silence-ms", "nan", str(cards)],
                  ["--vad-speech-pad-ms", "x", str(cards)], ["-f", "srt", str(cards)]):
        result = runner.invoke(vad_command, usage)
        assert result.exit_code == 2 and result.stdout == "", usage


def test_cli_keeps_its_program_and_reads_it_back_without_flax(tmp_path):
    """``wjx vad`` keeps the model's program in the compile cache as transcribe does: a second
    process reads it back, tracing nothing, so it never imports Flax (the first one does)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("WJX_", "JAX_", "XLA_"))}
    env["WJX_CACHE_DIR"] = str(tmp_path / "cache")
    runs = [subprocess.run([sys.executable, "-X", "importtime", "-m", "whisperjax_cli", "vad", str(DATA / "goforward.flac")],
                           capture_output=True, text=True, env=env) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[-1].stderr
    assert runs[0].stdout == runs[1].stdout and len(runs[0].stdout.splitlines()) >= 2
    flax = [any(line.split("|")[-1].strip() == "flax" for line in r.stderr.splitlines()) for r in runs]
    assert flax == [True, False]
    assert any(p.name.startswith("wjx-program-_run_block-") for p in (tmp_path / "cache").rglob("*"))
