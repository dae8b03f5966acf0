"""Classification: language ID against faster-whisper, HF-layout heads against numpy, training.

Real weights: ``base`` for language ID (multilingual) and ``tiny.en``'s encoder for training.
The head numerics and the top-layer training run on a small random encoder, so they are cheap.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile
from conftest import CLIPS, faster_whisper_model

from whisperjax_cli import weights
from whisperjax_cli.audio import SAMPLE_RATE
from whisperjax_cli.classifier import (
    ClassifierModel, WhisperClassifier, classify_files, head_logits, load_classifier, load_classify_model,
)
from whisperjax_cli.language import detect_language, language_windows, speech_start
from whisperjax_cli.dims import ModelDimensions
from whisperjax_cli.errors import AudioError, ModelError, UsageError
from whisperjax_cli.features import N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim
from whisperjax_cli.model import AudioEncoder
from whisperjax_cli.train import train_classifier

# A small random encoder: 2 one-head blocks of width 32 over the real 1500 positions.
SMALL = ModelDimensions(80, 1500, 32, 1, 2, 51865, 448, 32, 1, 2)


def small_encoder(seed: int) -> dict:
    return jax.jit(AudioEncoder(SMALL).init)(jax.random.PRNGKey(seed), jnp.zeros((1, N_FRAMES, 80)))["params"]

LABELS = ("bird", "cat", "dog")


def tone(freq: float, seconds: float, amp: float = 0.3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amp * np.sin(2 * np.pi * freq * t) + 0.003 * rng.standard_normal(t.size)).astype(np.float32)


# ---------------------------------------------------------------- language ID (base)


@pytest.fixture(scope="module")
def dev_lid(base, clip_audio):
    """Our language ID of every dev clip, one batched run (default options: silence skip on)."""
    names = [p.name for p in CLIPS]
    results = list(classify_files(base, [clip_audio[n] for n in names], top_k=3, batch_size=8))
    return dict(zip(names, results))


def test_language_id_matches_faster_whisper(base, clip_audio, dev_lid):
    assert len(dev_lid) == 12, "a dev clip is missing"
    fw = faster_whisper_model(base)
    for name, ours in dev_lid.items():
        assert ours.error is None and ours.windows == 1
        language, probability, _ = fw.detect_language(audio=clip_audio[name])  # the same array
        assert ours.labels[0][0] == language, name
        # The issue asks for 0.02; the same computation on the same array agrees to ~1e-6.
        assert abs(ours.labels[0][1] - probability) < 1e-3, (name, ours.labels[0], probability)
        assert [s for _, s in ours.labels] == sorted((s for _, s in ours.labels), reverse=True)


def test_russian_is_named(dev_lid):
    code, probability = dev_lid["russian-8k.wav"].labels[0]
    assert code == "ru" and probability > 0.9


def test_long_input_skips_silence_and_combines_windows(base, clip_audio):
    ru = clip_audio["russian-8k.wav"]
    noise = 1e-4 * np.random.default_rng(0).standard_normal(35 * SAMPLE_RATE).astype(np.float32)
    gap = np.zeros(SAMPLE_RATE, np.float32)
    long = np.concatenate([noise, ru, gap, ru, gap, ru, gap, ru])  # 35 s of hiss, then ~40 s of Russian
    mels, w = language_windows(long, base.n_mels, windows=2)
    assert mels.shape == (2, N_FRAMES, base.n_mels) and np.all(w > 0)
    (two,) = classify_files(base, [long], top_k=3, windows=2)
    assert two.windows == 2 and two.labels[0][0] == "ru" and two.labels[0][1] > 0.8
    # Without the skip, the one window is all hiss: Russian is not what it finds.
    noskip = detect_language(base, long, windows=1, skip_silence=False, top_k=99)
    assert dict(noskip)["ru"] < 0.5


def test_speech_start_and_windows_without_a_model():
    audio = np.concatenate([np.zeros(3 * SAMPLE_RATE, np.float32), tone(300, 2.0)])
    assert abs(speech_start(audio) / SAMPLE_RATE - 2.0) < 0.06  # 1 s of context kept (smoothing: 50 ms)
    assert speech_start(tone(300, 2.0)) == 0
    mels, w = language_windows(audio, 80, windows=3)
    assert mels.shape == (1, N_FRAMES, 80) and w.shape == (1,)  # only as many windows as content


def test_english_only_model_is_a_clear_error(tiny_en):
    with pytest.raises(UsageError, match="English-only"):
        load_classify_model("tiny.en")
    with pytest.raises(UsageError, match="English-only"):
        detect_language(tiny_en, tone(300, 1.0))


# ---------------------------------------------------------------- HF-layout heads vs numpy


def _random_head(weighted: bool, seed: int = 0):
    """A random ``WhisperForAudioClassification`` state under HF's PyTorch names."""
    enc = small_encoder(seed)
    state = weights.state_from_params({"encoder": enc}, SMALL, table=weights.encoder_table(SMALL, "encoder", "encoder"))
    rng = np.random.default_rng(seed)
    state["projector.weight"] = rng.normal(0, 0.2, (16, 32)).astype(np.float32)
    state["projector.bias"] = rng.normal(0, 0.2, (16,)).astype(np.float32)
    state["classifier.weight"] = rng.normal(0, 0.2, (3, 16)).astype(np.float32)
    state["classifier.bias"] = rng.normal(0, 0.2, (3,)).astype(np.float32)
    if weighted:
        state["layer_weights"] = rng.normal(0, 1.0, (SMALL.n_audio_layer + 1,)).astype(np.float32)
    return enc, state


def _write_head(path, state, weighted: bool, fmt: str):
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = {**SMALL.to_hf_config(), "architectures": ["WhisperForAudioClassification"],
              "id2label": {str(i): l for i, l in enumerate(LABELS)}, "classifier_proj_size": 16,
              "use_weighted_layer_sum": weighted}
    (path / "config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        save_file(state, str(path / "model.safetensors"))
    else:  # HF's Flax names; the top-level ``layer_weights`` is added by hand
        from flax.serialization import msgpack_restore, msgpack_serialize

        weights.write_flax_msgpack({k: v for k, v in state.items() if k != "layer_weights"}, path / "flax_model.msgpack")
        if "layer_weights" in state:
            tree = msgpack_restore((path / "flax_model.msgpack").read_bytes())
            tree["layer_weights"] = state["layer_weights"]
            (path / "flax_model.msgpack").write_bytes(msgpack_serialize(tree))
    return path


def _numpy_logits(hidden: list[np.ndarray], state: dict, weighted: bool) -> np.ndarray:
    """HF PyTorch's forward written out: weighted sum of hidden states, projector, mean, classifier."""
    if weighted:
        w = np.exp(state["layer_weights"] - state["layer_weights"].max())
        x = sum(wi / w.sum() * h for wi, h in zip(w, hidden))  # [batch, ctx, state]
    else:
        x = hidden[-1]
    x = x @ state["projector.weight"].T.astype(np.float64) + state["projector.bias"]
    return x.mean(axis=1) @ state["classifier.weight"].T.astype(np.float64) + state["classifier.bias"]


@pytest.mark.parametrize("weighted", [True, False])
def test_head_logits_match_numpy_in_both_formats(tmp_path, weighted):
    enc, state = _random_head(weighted)
    audio = [tone(300, 2.0), tone(1200, 7.0, seed=1)]
    mel = np.stack([log_mel_spectrogram(pad_or_trim(a, N_SAMPLES), 80) for a in audio])  # HF's features
    _, hidden = jax.jit(lambda p, m: AudioEncoder(SMALL).apply({"params": p}, m, True))(enc, mel)
    expected = _numpy_logits([np.asarray(h, np.float64) for h in hidden], state, weighted)
    for fmt in ("safetensors", "msgpack"):
        clf = load_classifier(_write_head(tmp_path / fmt, dict(state), weighted, fmt), dtype="float32")
        assert clf.labels == LABELS and clf.weighted_layer_sum == weighted
        logits = np.asarray(head_logits(clf.module, clf.params, mel))
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4, err_msg=fmt)
        # The trainer's form (time means first) is the same function.
        pooled = jnp.stack([h.mean(axis=1) for h in hidden], axis=1)
        fast = jax.jit(lambda p, x: clf.module.apply({"params": p}, x, method=WhisperClassifier.from_pooled))(
            clf.params, pooled)
        np.testing.assert_allclose(np.asarray(fast), expected, rtol=1e-4, atol=1e-4)
        probs = jax.nn.softmax(logits)
        (result,) = classify_files(clf, [audio[0]], top_k=2)
        assert result.labels[0] == (LABELS[int(np.argmax(probs[0]))], pytest.approx(float(probs[0].max()), abs=1e-5))


def test_head_loading_is_strict(tmp_path):
    _, state = _random_head(True)
    broken = dict(state)
    del broken["projector.bias"]
    with pytest.raises(ModelError, match="projector.bias"):
        load_classifier(_write_head(tmp_path / "missing", broken, True, "safetensors"))
    with pytest.raises(ModelError, match="unexpected tensors: decoder.extra"):
        load_classifier(_write_head(tmp_path / "extra", {**state, "decoder.extra": np.zeros(2, np.float32)},
                                    True, "safetensors"))
    with pytest.raises(ModelError, match="classifier.weight"):
        load_classifier(_write_head(tmp_path / "shape", {**state, "classifier.weight": np.zeros((4, 16), np.float32)},
                                    True, "safetensors"))
    assert isinstance(load_classify_model(str(_write_head(tmp_path / "ok", state, True, "msgpack"))), ClassifierModel)


def test_files_are_isolated_and_results_serialise(tmp_path):
    _, state = _random_head(True)
    clf = load_classifier(_write_head(tmp_path / "head", state, True, "safetensors"))
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio")
    results = list(classify_files(clf, [tone(300, 1.0), str(tmp_path / "missing.flac"), str(bad), tone(900, 40.0)],
                                  top_k=5, windows=2, batch_size=2))
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert isinstance(results[1].error, AudioError) and isinstance(results[2].error, AudioError)
    assert results[0].error is None and len(results[0].labels) == 3 and results[3].windows == 2
    row = results[0].to_dict("a.wav")
    assert row["file"] == "a.wav" and [l["label"] for l in row["labels"]] == [l for l, _ in results[0].labels]
    assert abs(sum(l["score"] for l in row["labels"]) - 1) < 1e-3


# ---------------------------------------------------------------- training


def _small_model(tmp_path):
    """A stand-in WhisperModel with the small random encoder (what the trainer reads)."""
    enc = small_encoder(1)
    return types.SimpleNamespace(dims=SMALL, params={"encoder": enc}, n_mels=80, path=tmp_path, config={})


def _tone_dataset(root, per_label: int = 4):
    for i, (label, freq) in enumerate({"high": 2000.0, "low": 250.0}.items()):
        (root / label).mkdir(parents=True)
        for j in range(per_label):
            audio = tone(freq * (1 + 0.05 * j), 1.0 + 0.3 * j, seed=10 * i + j)
            soundfile.write(root / label / f"{j}.wav", audio, SAMPLE_RATE)
    (root / "low" / "README.txt").write_text("not audio: reported, not fatal")


def test_training_is_deterministic_and_trains_top_layers(tmp_path):
    model = _small_model(tmp_path)
    _tone_dataset(tmp_path / "data")
    runs = []
    for out in ("a", "b"):
        seen = []
        report = train_classifier(tmp_path / "data", model, tmp_path / out, epochs=2, seed=3, val_fraction=0.25,
                                  train_top_layers=1, encoder_lr=1e-3, progress=lambda *a: seen.append(a[0]))
        runs.append(weights.read_safetensors(tmp_path / out))
        assert report.train_size == 6 and report.val_size == 2 and len(report.skipped) == 1
        assert "features" in seen and "train" in seen
    assert runs[0].keys() == runs[1].keys()
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])
    # Only the top block (and the final norm) moved.
    frozen = weights.state_from_params({"encoder": model.params["encoder"]}, SMALL,
                                       table=weights.encoder_table(SMALL, "encoder", "encoder"))
    assert np.array_equal(runs[0]["encoder.layers.0.fc1.weight"], frozen["encoder.layers.0.fc1.weight"])
    assert not np.array_equal(runs[0]["encoder.layers.1.fc1.weight"], frozen["encoder.layers.1.fc1.weight"])
    clf = load_classifier(tmp_path / "a", dtype="float32")
    files = [f for f, _, _ in report.val_predictions]
    reloaded = np.array([dict(r.labels)[l] for r in classify_files(clf, files, top_k=2) for l in clf.labels]
                        ).reshape(len(files), 2)
    np.testing.assert_allclose(reloaded, report.val_probs, atol=1e-4)


ESPEAK = shutil.which("espeak-ng")
LANGUAGES = ("de", "en", "es")


@pytest.mark.skipif(ESPEAK is None, reason="espeak-ng is not installed (apt-get install -y espeak-ng)")
def test_trained_language_classifier_generalises_and_reloads(tmp_path, tiny_en):
    """German, English and Spanish numbers spoken by espeak-ng at random speeds and pitches:
    every clip says different numbers, so the held-out clips are new utterances."""
    rng = np.random.default_rng(0)
    for lang in LANGUAGES:
        (tmp_path / "data" / lang).mkdir(parents=True)
        for i in range(6):
            text = " ".join(str(rng.integers(10, 10000)) for _ in range(2))
            subprocess.run([ESPEAK, "-v", lang, "-s", str(rng.integers(130, 190)), "-p", str(rng.integers(30, 70)),
                            "-w", str(tmp_path / "data" / lang / f"{i}.wav"), text], check=True)
    report = train_classifier(tmp_path / "data", tiny_en, tmp_path / "clf", epochs=30, val_fraction=1 / 3, seed=0)
    assert report.labels == LANGUAGES and report.val_size == 6 and report.train_size == 12
    assert report.val_accuracy >= 5 / 6, report.val_predictions  # held-out accuracy: at least 5 of 6
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert config["architectures"] == ["WhisperForAudioClassification"]
    assert config["id2label"] == {"0": "de", "1": "en", "2": "es"} and config["use_weighted_layer_sum"] is True
    assert (tmp_path / "clf" / "tokenizer.json").is_file()
    clf = load_classify_model(str(tmp_path / "clf"))
    files = [f for f, _, _ in report.val_predictions]
    results = list(classify_files(clf, files, top_k=3))
    assert [r.labels[0][0] for r in results] == [p for _, _, p in report.val_predictions]
    probs = np.array([[dict(r.labels)[l] for l in LANGUAGES] for r in results])
    np.testing.assert_allclose(probs, report.val_probs, atol=1e-4)


def test_language_id_skips_leading_music(base, clip_audio):
    """Language ID reads speech, not what comes before it: 40 s of loud synthetic music
    (chords and a beat) before Russian speech is skipped by the VAD (an energy gate keeps it)."""
    rate = SAMPLE_RATE
    t = np.arange(40 * rate) / rate
    chord = sum(np.sin(2 * np.pi * f * t) for f in (220, 277, 330, 440))
    beat = (np.sin(2 * np.pi * 2 * t) > 0.9).astype(np.float32)
    music = (0.1 * chord * (0.6 + 0.4 * beat)).astype(np.float32)
    ru = clip_audio["russian-8k.wav"]
    audio = np.concatenate([music, ru, ru])
    labels = detect_language(base, audio, top_k=3)
    assert labels[0][0] == "ru" and labels[0][1] > 0.8, labels
    from whisperjax_cli.language import first_speech

    assert abs(first_speech(audio) / rate - 39.0) < 1.0  # 1 s of context before the speech at 40 s
