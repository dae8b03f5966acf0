"""Loading the same checkpoint from every format, and strict failures that name the tensor."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from whisperjax_cli import weights
from whisperjax_cli.errors import ModelError
from whisperjax_cli.model import Whisper
from whisperjax_cli.loading import load_model, read_model_dir
from whisperjax_cli.hub import resolve_model


def _logits(model, mel, tokens):
    return np.asarray(jax.jit(lambda p: Whisper(model.dims).apply({"params": p}, mel, tokens))(model.params))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tiny_en):
    """The bundled tiny.en written as HF safetensors and HF flax msgpack directories."""
    root = tmp_path_factory.mktemp("formats")
    state = weights.state_from_params(jax.device_get(tiny_en.params), tiny_en.dims)
    dirs = {}
    for kind in ("safetensors", "flax"):
        d = root / kind
        d.mkdir()
        (d / "config.json").write_text(json.dumps(tiny_en.dims.to_hf_config()))
        shutil.copy(tiny_en.path / "tokenizer.json", d / "tokenizer.json")
        if kind == "safetensors":
            save_file(state, str(d / "model.safetensors"))
        else:
            weights.write_flax_msgpack(state, d / "flax_model.msgpack")
        dirs[kind] = d
    return dirs


def test_same_logits_from_ctranslate2_safetensors_and_flax(tiny_en, tiny_dirs):
    mel = jax.random.normal(jax.random.PRNGKey(0), (1, 3000, 80)) * 0.3
    tokens = jnp.array([[50257, 50362, 1514, 2651, 838]])
    reference = _logits(tiny_en, mel, tokens)
    for kind, d in tiny_dirs.items():
        other = load_model(str(d), dtype="float32")
        assert read_model_dir(d).kind == kind
        np.testing.assert_array_equal(_logits(other, mel, tokens), reference, err_msg=kind)


def test_sharded_safetensors_with_index(tmp_path, tiny_en, tiny_dirs):
    from safetensors.numpy import load_file

    state = load_file(str(tiny_dirs["safetensors"] / "model.safetensors"))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / shard))
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(tiny_dirs["safetensors"] / "config.json", tmp_path / "config.json")
    files = read_model_dir(tmp_path)
    assert set(files.state) == set(state)
    np.testing.assert_array_equal(files.state["model.decoder.embed_tokens.weight"], state["model.decoder.embed_tokens.weight"])


def test_missing_tensor_is_named(tmp_path, tiny_dirs):
    from safetensors.numpy import load_file

    state = load_file(str(tiny_dirs["safetensors"] / "model.safetensors"))
    del state["model.decoder.layers.2.fc1.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(tiny_dirs["safetensors"] / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelError, match=r"missing tensor 'model\.decoder\.layers\.2\.fc1\.bias'"):
        load_model(str(tmp_path))


def test_wrong_shape_is_named(tmp_path, tiny_dirs):
    from safetensors.numpy import load_file

    state = load_file(str(tiny_dirs["safetensors"] / "model.safetensors"))
    state["model.encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((384, 380), np.float32)
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(tiny_dirs["safetensors"] / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelError, match=r"'model\.encoder\.layers\.0\.self_attn\.q_proj\.weight' has shape \(384, 380\), expected \(384, 384\)"):
        load_model(str(tmp_path))


def test_unexpected_tensor_is_named(tmp_path, tiny_dirs):
    from safetensors.numpy import load_file

    state = load_file(str(tiny_dirs["safetensors"] / "model.safetensors"))
    state["model.decoder.extra.weight"] = np.zeros((2,), np.float32)
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(tiny_dirs["safetensors"] / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelError, match="unexpected tensors: model.decoder.extra.weight"):
        load_model(str(tmp_path))


def test_pickles_are_refused_never_read(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04this would be a pickle")
    with pytest.raises(ModelError, match="never unpickles"):
        read_model_dir(tmp_path)


def test_truncated_ctranslate2_file(tmp_path, tiny_en):
    data = (tiny_en.path / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelError, match="corrupt CTranslate2 model file"):
        read_model_dir(tmp_path)


def test_empty_directory_and_unknown_name(tmp_path):
    with pytest.raises(ModelError, match="no weights found"):
        read_model_dir(tmp_path)
    with pytest.raises(ModelError, match="unknown model"):
        resolve_model("definitely-not-a-model")


def test_int8_ctranslate2_weights_are_dequantized_like_ctranslate2(tmp_path, tiny_en, clip_audio):
    """int8 weights (CTranslate2's per-row scale) load, and decode as CTranslate2 decodes them."""
    from faster_whisper import WhisperModel

    from whisperjax_cli.longform import transcribe

    tensors, aliases = weights.read_ct2(tiny_en.path / "model.bin")
    quantized = {}
    for name, value in tensors.items():
        if name.endswith("/weight") and value.ndim == 2 and "embeddings" not in name:
            w = value.astype(np.float32)
            scale = 127.0 / np.maximum(np.abs(w).max(axis=1), 1e-8)
            quantized[name] = np.round(w * scale[:, None]).astype(np.int8)
            quantized[name + "_scale"] = scale.astype(np.float32)
        else:
            quantized[name] = value
    weights.write_ct2(tmp_path / "model.bin", quantized, aliases)
    for f in tiny_en.path.iterdir():
        if f.name != "model.bin":
            shutil.copy(f, tmp_path / f.name)
    ours = load_model(str(tmp_path), dtype="float32")
    w = np.asarray(ours.params["decoder"]["blocks_0"]["mlp1"]["kernel"])
    ref = np.asarray(tiny_en.params["decoder"]["blocks_0"]["mlp1"]["kernel"])
    assert 0 < np.abs(w - ref).max() < 0.02
    audio = clip_audio["goforward.flac"]
    fw = WhisperModel(str(tmp_path), device="cpu", compute_type="float32")
    segs, _ = fw.transcribe(audio, beam_size=1, without_timestamps=True, temperature=0.0)
    theirs = [t for s in segs for t in s.tokens]
    got = [t for s in transcribe(ours, audio, temperature=0.0, without_timestamps=True).segments for t in s.tokens]
    assert got == theirs and len(got) > 3


def test_shapes_not_bundled_decode_as_ctranslate2(tmp_path, clip_audio):
    """A CTranslate2 model in shapes the bundled ones lack (random weights, weights.random_ct2):
    large-v3's 128 mel bins, a distil-whisper-like decoder of 2 blocks under an encoder of 4,
    6 heads 32 wide. wjx reads it, encodes the same log-mel as CTranslate2 does and then greedily
    decodes the same 40 tokens (end-of-text suppressed on both sides, so both decode them all;
    with the two decoder blocks swapped, the tokens differ)."""
    import ctranslate2

    from whisperjax_cli.decoding import encode
    from whisperjax_cli.features import N_FRAMES, log_mel_spectrogram, pad_or_trim
    from whisperjax_cli.options import TranscribeOptions
    from whisperjax_cli.window_decoder import WindowDecoder

    # weights N(0, 0.2): with 0.02 the decoder repeats one token, which would prove little
    weights.random_ct2(resolve_model("base"), tmp_path, 192, 6, (4, 2), n_mels=128, scale=0.2)
    model = load_model(str(tmp_path), dtype="float32")
    d = model.dims
    assert (d.n_mels, d.n_audio_state, d.n_audio_head, d.n_audio_layer, d.n_text_layer) == (128, 192, 6, 4, 2)

    mel = pad_or_trim(np.asarray(log_mel_spectrogram(clip_audio["goforward.flac"], n_mels=128)), N_FRAMES)
    ct2 = ctranslate2.models.Whisper(str(tmp_path), device="cpu", compute_type="float32")
    features = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel.T[None]))
    theirs_audio = np.asarray(ct2.encode(features, to_cpu=True))
    ours_audio = encode(model.module, model.params, mel[None], np.int32(1))
    np.testing.assert_allclose(np.asarray(ours_audio), theirs_audio, atol=2e-4, rtol=0)

    tok = model.tokenizer
    prompt = [*tok.sot_sequence_for("en", "transcribe"), tok.no_timestamps]
    steps = 40
    theirs = ct2.generate(features, [prompt], beam_size=1, max_length=2 * steps,  # CTranslate2 decodes half of it
                          suppress_tokens=[-1, tok.eot], suppress_blank=False)[0].sequences_ids[0]
    opts = TranscribeOptions(temperature=(0.0,), without_timestamps=True, sample_len=steps,
                             suppress_tokens=f"-1,{tok.eot}", suppress_blank=False, stop_loops=False)
    ours = WindowDecoder(model, opts).decode(ours_audio, 1, [prompt], len(prompt), None)[0].tokens
    assert len(theirs) == steps and len(set(theirs)) > steps // 2  # varied text, not one token over and over
    assert list(ours) == list(theirs)
