"""Strict weight loading from an explicit name table.

Every format is first read into one canonical form, a flat ``{HF PyTorch name: array}`` dict
(``model.encoder.layers.0.self_attn.q_proj.weight`` …, PyTorch layouts). The table below maps
each of our Flax parameters to one canonical name and a layout change; loading asserts that
every parameter is filled, every shape matches and every checkpoint tensor is used.

Formats: CTranslate2 ``model.bin`` (fused QKV; float32/float16/bfloat16/int8), HF
``model.safetensors`` (sharded too), HF ``flax_model.msgpack``. Pickles are never read.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from whisperjax_cli.dims import ModelDimensions
from whisperjax_cli.errors import ModelError

# Layout changes from the canonical (PyTorch) tensor to ours (Flax):
#   "linear": [out, in] -> [in, out];  "conv": [out, in, width] -> [width, in, out];  "copy".
_TO_FLAX = {
    "linear": lambda w: w.T,
    "conv": lambda w: w.transpose(2, 1, 0),
    "copy": lambda w: w,
}
_FROM_FLAX = {"linear": lambda w: w.T, "conv": lambda w: w.transpose(2, 1, 0), "copy": lambda w: w}


def _attention_rows(ours: str, hf: str) -> Iterator[tuple[str, str, str]]:
    for mine, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "out_proj")):
        yield f"{ours}/{mine}/kernel", f"{hf}.{theirs}.weight", "linear"
        if mine != "key":  # Whisper's key projection has no bias
            yield f"{ours}/{mine}/bias", f"{hf}.{theirs}.bias", "copy"


def _layer_norm_rows(ours: str, hf: str) -> Iterator[tuple[str, str, str]]:
    yield f"{ours}/scale", f"{hf}.weight", "copy"
    yield f"{ours}/bias", f"{hf}.bias", "copy"


def _block_rows(ours: str, hf: str, cross: bool) -> Iterator[tuple[str, str, str]]:
    yield from _attention_rows(f"{ours}/attn", f"{hf}.self_attn")
    yield from _layer_norm_rows(f"{ours}/attn_ln", f"{hf}.self_attn_layer_norm")
    if cross:
        yield from _attention_rows(f"{ours}/cross_attn", f"{hf}.encoder_attn")
        yield from _layer_norm_rows(f"{ours}/cross_attn_ln", f"{hf}.encoder_attn_layer_norm")
    for mine, theirs in (("mlp1", "fc1"), ("mlp2", "fc2")):
        yield f"{ours}/{mine}/kernel", f"{hf}.{theirs}.weight", "linear"
        yield f"{ours}/{mine}/bias", f"{hf}.{theirs}.bias", "copy"
    yield from _layer_norm_rows(f"{ours}/mlp_ln", f"{hf}.final_layer_norm")


def encoder_table(dims: ModelDimensions, ours: str = "encoder", hf: str = "model.encoder"):
    """(our path, canonical name, layout) rows for the audio encoder."""
    rows = [
        (f"{ours}/conv1/kernel", f"{hf}.conv1.weight", "conv"),
        (f"{ours}/conv1/bias", f"{hf}.conv1.bias", "copy"),
        (f"{ours}/conv2/kernel", f"{hf}.conv2.weight", "conv"),
        (f"{ours}/conv2/bias", f"{hf}.conv2.bias", "copy"),
        (f"{ours}/positional_embedding", f"{hf}.embed_positions.weight", "copy"),
    ]
    for i in range(dims.n_audio_layer):
        rows += _block_rows(f"{ours}/blocks_{i}", f"{hf}.layers.{i}", cross=False)
    rows += _layer_norm_rows(f"{ours}/ln_post", f"{hf}.layer_norm")
    return rows


def name_table(dims: ModelDimensions) -> list[tuple[str, str, str]]:
    """Every parameter of :class:`~whisperjax_cli.model.Whisper` and where it comes from."""
    rows = encoder_table(dims)
    rows += [
        ("decoder/token_embedding", "model.decoder.embed_tokens.weight", "linear"),  # kept [state, vocab]
        ("decoder/positional_embedding", "model.decoder.embed_positions.weight", "copy"),
    ]
    for i in range(dims.n_text_layer):
        rows += _block_rows(f"decoder/blocks_{i}", f"model.decoder.layers.{i}", cross=True)
    rows += _layer_norm_rows("decoder/ln", "model.decoder.layer_norm")
    return rows


def expected_shapes(dims: ModelDimensions) -> dict[str, tuple[int, ...]]:
    """Canonical (PyTorch-layout) shape of every tensor in :func:`name_table`.

    Worked out from the dimensions, row by row, instead of tracing the Flax model's init
    (``jax.eval_shape`` took ~0.2 s of every model load); tests check the two agree.
    """
    return {theirs: _canonical_shape(theirs, dims) for _, theirs, _ in name_table(dims)}


def _canonical_shape(name: str, dims: ModelDimensions) -> tuple[int, ...]:
    """Shape of one canonical tensor (``model.{encoder,decoder}....``) for ``dims``."""
    parts = name.split(".")
    encoder = "decoder" not in parts[:2]
    d = dims.n_audio_state if encoder else dims.n_text_state
    module, leaf = parts[-2], parts[-1]
    if module == "embed_positions":
        return (dims.n_audio_ctx if encoder else dims.n_text_ctx, d)
    if module == "embed_tokens":
        return (dims.n_vocab, d)
    if module in ("conv1", "conv2"):
        width_in = dims.n_mels if module == "conv1" else d
        return (d, width_in, 3) if leaf == "weight" else (d,)
    if module == "fc1":
        return (4 * d, d) if leaf == "weight" else (4 * d,)
    if module == "fc2":
        return (d, 4 * d) if leaf == "weight" else (d,)
    if module.endswith("_proj"):
        # Cross-attention keys and values project the audio (n_audio_state wide) to the text state.
        width_in = dims.n_audio_state if parts[-3] == "encoder_attn" and module in ("k_proj", "v_proj") else d
        return (d, width_in) if leaf == "weight" else (d,)
    return (d,)  # layer norms


_ALIGN = 64  # bytes: XLA's CPU client adopts host buffers aligned like this instead of copying them
_BLOCK_ROWS = 256


def device_layout(x: np.ndarray, dtype) -> np.ndarray:
    """``x`` cast to ``dtype``, C-contiguous, in a freshly allocated 64-byte aligned buffer.

    For :func:`jax.device_put` on CPU: an aligned buffer is used in place, not copied again.
    A big transposed matrix (our layout of a PyTorch ``[out, in]`` weight, the token embedding
    above all) is copied a block of rows at a time, so reads and writes both stay in cache;
    numpy's element-strided copy of the 51,864 x 384 embedding took twice as long.
    """
    dtype = np.dtype(dtype)
    if x.dtype == np.float16 and dtype not in (np.float16, np.float32):
        x = x.astype(np.float32)  # float16 -> bfloat16 rounds exactly as it did through float32
    nbytes = x.size * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    out = raw[start : start + nbytes].view(dtype).reshape(x.shape)
    if x.ndim == 2 and x.size >= 1 << 20 and x.T.flags.c_contiguous and not x.flags.c_contiguous:
        source = x.T
        for i in range(0, source.shape[0], _BLOCK_ROWS):
            out[:, i : i + _BLOCK_ROWS] = source[i : i + _BLOCK_ROWS].T
    else:
        out[...] = x
    return out


def is_mixed_weight(path: tuple[str, ...]) -> bool:
    """Whether the parameter at ``path`` is stored in the matmul dtype of a model that has one:
    the kernels of the encoder's blocks and the token embedding (the output projection)."""
    encoder_block = len(path) > 2 and path[0] == "encoder" and path[1].startswith("blocks_")
    return (encoder_block and path[-1] == "kernel") or tuple(path) == ("decoder", "token_embedding")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict) or hasattr(value, "items"):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def params_from_state(
    state: dict[str, np.ndarray], dims: ModelDimensions, source: str, table=None, strict_unused=True
) -> dict:
    """Builds our parameter tree from a canonical state dict, checking every name and shape.

    Raises:
      ModelError: naming the first missing tensor, a wrong shape, or unused tensors.
    """
    table = name_table(dims) if table is None else table
    state = dict(state)
    # The output projection is tied to the token embedding; a separate copy must be equal.
    proj = state.pop("proj_out.weight", None)
    shapes = expected_shapes(dims)
    flat = {}
    for ours, theirs, kind in table:
        if theirs not in state:
            raise ModelError(source, f"missing tensor '{theirs}'")
        value = np.asarray(state.pop(theirs))
        if value.shape != tuple(shapes[theirs]):
            raise ModelError(
                source, f"tensor '{theirs}' has shape {value.shape}, expected {tuple(shapes[theirs])}"
            )
        flat[ours] = _TO_FLAX[kind](value)
    if proj is not None and proj.shape[::-1] != flat["decoder/token_embedding"].shape:
        raise ModelError(source, "tensor 'proj_out.weight' does not match the token embedding")
    if strict_unused and state:
        raise ModelError(source, f"unexpected tensors: {', '.join(sorted(state)[:5])}")
    return unflatten(flat)


def state_from_params(params: dict, dims: ModelDimensions, table=None) -> dict[str, np.ndarray]:
    """The inverse of :func:`params_from_state`: canonical (HF PyTorch) names and layouts."""
    flat = flatten(params)
    table = name_table(dims) if table is None else table
    return {theirs: np.ascontiguousarray(_FROM_FLAX[kind](np.asarray(flat[ours]))) for ours, theirs, kind in table}


# ---------------------------------------------------------------- CTranslate2 model.bin

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


def read_ct2(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads a CTranslate2 ``model.bin`` into ``({name: array}, {alias: name})``.

    The format (ctranslate2/specs/model_spec.py ``_serialize``): uint32 version, name, uint32
    revision, uint32 count, then per variable: name, uint8 rank, uint32 dims, uint8 dtype,
    uint32 nbytes, data; then uint32 alias count and (alias, target) name pairs.
    """
    buf = _map_file(path)
    off = 0

    def take(fmt: str):
        nonlocal off
        (value,) = struct.unpack_from(fmt, buf, off)
        off += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal off
        n = take("H")
        value = bytes(buf[off : off + n - 1]).decode("utf-8")
        off += n
        return value

    try:
        version = take("I")
        if version > 6 or version < 5:
            raise ModelError(path, f"unsupported CTranslate2 binary version {version}")
        spec = string()
        if "Whisper" not in spec:
            raise ModelError(path, f"not a Whisper model (CTranslate2 spec '{spec}')")
        take("I")  # spec revision
        tensors = {}
        for _ in range(take("I")):
            name = string()
            shape = tuple(take("I") for _ in range(take("B")))
            dtype_id = take("B")
            nbytes = take("I")
            raw = np.frombuffer(buf[off : off + nbytes], dtype=np.uint8)
            off += nbytes
            tensors[name] = _ct2_array(raw, dtype_id, shape)
        aliases = {}
        for _ in range(take("I")):
            alias = string()
            aliases[alias] = string()
    except (struct.error, UnicodeDecodeError, ValueError) as err:
        raise ModelError(path, f"corrupt CTranslate2 model file ({err})") from None
    return tensors, aliases


def write_ct2(path: Path, tensors: dict[str, np.ndarray], aliases: dict[str, str]) -> None:
    """Writes ``tensors`` and ``aliases`` as a CTranslate2 ``model.bin`` (version 6, the layout
    :func:`read_ct2` reads; float32, int8, int16, int32 and float16 arrays), whole or not at all.
    For tests and benchmarks: made-up weights that both wjx and CTranslate2 load."""
    ids = {np.dtype(t): i for i, t in _CT2_DTYPES.items() if t != "bfloat16"}

    def string(s: str) -> bytes:
        return struct.pack("H", len(s) + 1) + s.encode() + b"\0"

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("I", 6) + string("WhisperSpec") + struct.pack("I", 3) + struct.pack("I", len(tensors)))
        for name, value in tensors.items():
            value = np.array(value, order="C")  # (ascontiguousarray would make scalars 1-D)
            f.write(string(name) + struct.pack("B", value.ndim) + b"".join(struct.pack("I", d) for d in value.shape)
                    + struct.pack("B", ids[value.dtype]) + struct.pack("I", value.nbytes))
            f.write(value.tobytes())
        f.write(struct.pack("I", len(aliases)) + b"".join(string(a) + string(t) for a, t in aliases.items()))
    tmp.replace(path)


def random_ct2(like: Path, folder: Path, width: int, heads: int, layers: tuple[int, int],
               n_mels: Optional[int] = None, seed: int = 0, scale: float = 0.02) -> Path:
    """Writes into ``folder`` a CTranslate2 model made up in the layout of the one in folder
    ``like`` and returns ``folder``: ``width`` wide with ``heads`` heads, ``layers`` (encoder,
    decoder) blocks, ``n_mels`` mel bins (``like``'s when None); the vocabulary, context lengths,
    tokenizer and config files stay ``like``'s. Weights N(0, ``scale``), layer-norm gains 1, biases
    0, all float16 (as CTranslate2 converts); ``like``'s flags and alignment settings are kept.
    For tests and benchmarks (model sizes and shapes that are not at hand)."""
    import shutil

    tensors, aliases = read_ct2(like / "model.bin")
    old = tensors["encoder/position_encodings/encodings"].shape[1]  # like's width: every multiple of it scales
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in tensors.items():
        match = re.match(r"(encoder|decoder)/layer_(\d+)/(.*)", name)
        if match and int(match.group(2)) != 0:
            continue  # layer 0 stands for every layer made below
        count = layers[match.group(1) == "decoder"] if match else 1
        targets = [name] if not match else [f"{match.group(1)}/layer_{i}/{match.group(3)}" for i in range(count)]
        shape = tuple(d * width // old if d % old == 0 else d for d in value.shape)
        if name == "encoder/conv1/weight" and n_mels is not None:  # [width, n_mels, 3]
            shape = (shape[0], n_mels, shape[2])
        for target in targets:
            if name.endswith("num_heads"):
                out[target] = np.array(heads, value.dtype)
            elif value.dtype not in (np.float16, np.float32):
                out[target] = value
            elif name.endswith("gamma"):
                out[target] = np.ones(shape, np.float16)
            elif name.endswith(("beta", "bias")):
                out[target] = np.zeros(shape, np.float16)
            else:
                out[target] = (rng.standard_normal(shape, np.float32) * scale).astype(np.float16)
    folder.mkdir(parents=True, exist_ok=True)
    for f in like.iterdir():
        if f.is_file() and f.name != "model.bin":
            shutil.copy(f, folder / f.name)
    write_ct2(folder / "model.bin", out, aliases)
    return folder


def _map_file(path: Path) -> memoryview:
    """The file's bytes, memory-mapped read-only (tensors are views: no 75+ MB copy at load)."""
    import mmap

    with open(path, "rb") as f:
        try:
            return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        except (OSError, ValueError):  # empty, or a file that cannot be mapped
            return memoryview(f.read())


def _ct2_array(raw: np.ndarray, dtype_id: int, shape) -> np.ndarray:
    dtype = _CT2_DTYPES.get(dtype_id)
    if dtype is None:
        raise ValueError(f"unknown dtype id {dtype_id}")
    if dtype == "bfloat16":  # numpy has no bfloat16: widen the 16 bits into float32's top half
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return raw.view(dtype).reshape(shape)


class _Ct2Tensors(dict):
    """CTranslate2 variables by name; with ``keep_half``, float16 ones are not widened."""

    keep_half = False


def _ct2_tensor(tensors: dict, name: str) -> np.ndarray:
    """A float32 tensor (float16 as stored, read-only, under ``keep_half``); int8 weights are
    dequantized with their per-row ``weight_scale``."""
    value = tensors[name]
    if value.dtype == np.int8:
        scale = tensors[name.replace("/weight", "/weight_scale")]
        scale = np.asarray(scale, np.float32).reshape(-1, *([1] * (value.ndim - 1)))
        return np.divide(value, scale, dtype=np.float32)  # = astype(float32) / scale, in one pass
    if value.dtype == np.float16 and getattr(tensors, "keep_half", False):
        return value
    return value.astype(np.float32)


def ct2_to_state(
    tensors: dict, aliases: dict, source, float32: bool = True
) -> tuple[dict[str, np.ndarray], ModelDimensions]:
    """Canonical state dict and dimensions from CTranslate2 variables (splitting fused QKV).

    With ``float32=False``, float16 tensors stay float16 views of the file's bytes, for a
    caller that converts them once anyway (:func:`~whisperjax_cli.loading.load_model`).
    """
    for alias, target in aliases.items():
        tensors.setdefault(alias, tensors[target])
    tensors = _Ct2Tensors(tensors)
    tensors.keep_half = not float32
    try:
        dims = _ct2_dims(tensors)
        state = {}
        for side, n_layer in (("encoder", dims.n_audio_layer), ("decoder", dims.n_text_layer)):
            hf = f"model.{side}"
            state[f"{hf}.embed_positions.weight"] = _ct2_tensor(tensors, f"{side}/position_encodings/encodings")
            state[f"{hf}.layer_norm.weight"] = _ct2_tensor(tensors, f"{side}/layer_norm/gamma")
            state[f"{hf}.layer_norm.bias"] = _ct2_tensor(tensors, f"{side}/layer_norm/beta")
            for i in range(n_layer):
                state.update(_ct2_layer(tensors, f"{side}/layer_{i}", f"{hf}.layers.{i}", side == "decoder"))
        for conv in ("conv1", "conv2"):
            state[f"model.encoder.{conv}.weight"] = _ct2_tensor(tensors, f"encoder/{conv}/weight")
            state[f"model.encoder.{conv}.bias"] = _ct2_tensor(tensors, f"encoder/{conv}/bias")
        state["model.decoder.embed_tokens.weight"] = _ct2_tensor(tensors, "decoder/embeddings/weight")
    except KeyError as err:
        raise ModelError(source, f"missing tensor {err}") from None
    return state, dims


def _ct2_dims(tensors: dict) -> ModelDimensions:
    def layers(side):
        return len({m.group(1) for k in tensors if (m := re.match(rf"{side}/layer_(\d+)/", k))})

    emb = tensors["decoder/embeddings/weight"]
    audio_pos = tensors["encoder/position_encodings/encodings"]
    return ModelDimensions(
        n_mels=tensors["encoder/conv1/weight"].shape[1],
        n_audio_ctx=audio_pos.shape[0],
        n_audio_state=audio_pos.shape[1],
        n_audio_head=int(tensors["encoder/num_heads"]),
        n_audio_layer=layers("encoder"),
        n_vocab=emb.shape[0],
        n_text_ctx=tensors["decoder/position_encodings/encodings"].shape[0],
        n_text_state=emb.shape[1],
        n_text_head=int(tensors["decoder/num_heads"]),
        n_text_layer=layers("decoder"),
    )


def _ct2_layer(t: dict, ct2: str, hf: str, cross: bool) -> dict[str, np.ndarray]:
    out = {}
    w = _ct2_tensor(t, f"{ct2}/self_attention/linear_0/weight")  # fused [3 * state, state]
    b = _ct2_tensor(t, f"{ct2}/self_attention/linear_0/bias")
    (wq, wk, wv), (bq, _, bv) = np.split(w, 3), np.split(b, 3)  # the key bias is zero by design
    out.update(_proj(f"{hf}.self_attn", wq, bq, wk, wv, bv, t, f"{ct2}/self_attention/linear_1"))
    out.update(_ln(t, f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm"))
    if cross:
        wk, wv = np.split(_ct2_tensor(t, f"{ct2}/attention/linear_1/weight"), 2)  # fused [2 * state, state]
        _, bv = np.split(_ct2_tensor(t, f"{ct2}/attention/linear_1/bias"), 2)
        wq = _ct2_tensor(t, f"{ct2}/attention/linear_0/weight")
        bq = _ct2_tensor(t, f"{ct2}/attention/linear_0/bias")
        out.update(_proj(f"{hf}.encoder_attn", wq, bq, wk, wv, bv, t, f"{ct2}/attention/linear_2"))
        out.update(_ln(t, f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm"))
    for i, fc in enumerate(("fc1", "fc2")):
        out[f"{hf}.{fc}.weight"] = _ct2_tensor(t, f"{ct2}/ffn/linear_{i}/weight")
        out[f"{hf}.{fc}.bias"] = _ct2_tensor(t, f"{ct2}/ffn/linear_{i}/bias")
    out.update(_ln(t, f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm"))
    return out


def _proj(hf, wq, bq, wk, wv, bv, t, out_name) -> dict[str, np.ndarray]:
    return {
        f"{hf}.q_proj.weight": wq, f"{hf}.q_proj.bias": bq,
        f"{hf}.k_proj.weight": wk,
        f"{hf}.v_proj.weight": wv, f"{hf}.v_proj.bias": bv,
        f"{hf}.out_proj.weight": _ct2_tensor(t, f"{out_name}/weight"),
        f"{hf}.out_proj.bias": _ct2_tensor(t, f"{out_name}/bias"),
    }  # fmt: skip


def _ln(t: dict, ct2: str, hf: str) -> dict[str, np.ndarray]:
    return {f"{hf}.weight": _ct2_tensor(t, f"{ct2}/gamma"), f"{hf}.bias": _ct2_tensor(t, f"{ct2}/beta")}


# ---------------------------------------------------------------- Hugging Face files

def read_safetensors(model_dir: Path, float32: bool = True) -> dict[str, np.ndarray]:
    """``model.safetensors``, or every shard listed in ``model.safetensors.index.json``; every
    tensor float32 (float16 ones kept as stored with ``float32=False``)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    state = {}
    for shard in shards:
        try:
            state.update(load_file(model_dir / shard))
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelError(model_dir / shard, f"cannot read safetensors ({err})") from None
    keep = (np.float32,) if float32 else (np.float32, np.float16)
    return {k: v if v.dtype in keep else np.asarray(v, np.float32) for k, v in state.items()}


def read_flax_msgpack(path: Path) -> dict[str, np.ndarray]:
    """HF ``flax_model.msgpack`` into the canonical names and layouts.

    Flax names map to PyTorch ones generically: '/' becomes '.', and the leaf ``kernel``
    (transposed), ``scale`` and ``embedding`` all become ``weight``.
    """
    from flax.serialization import msgpack_restore

    try:
        tree = msgpack_restore(Path(path).read_bytes())
    except Exception as err:  # msgpack raises several unrelated types on bad input
        raise ModelError(path, f"cannot read flax msgpack ({type(err).__name__})") from None
    if not isinstance(tree, dict):
        raise ModelError(path, "not a Flax parameter tree (expected a mapping of names to arrays)")
    try:
        return _flax_state(tree)
    except (TypeError, ValueError, AttributeError) as err:
        raise ModelError(path, f"not a Flax parameter tree ({type(err).__name__}: {err})") from None


def _flax_state(tree: dict) -> dict[str, np.ndarray]:
    state = {}
    for name, value in flatten(tree).items():
        if not isinstance(value, np.ndarray) or value.dtype.kind in "OSUb":
            raise TypeError(f"{name} is not an array of numbers")
        value = np.asarray(value, np.float32)
        *parents, leaf = name.split("/")
        if leaf == "kernel":
            value = value.T if value.ndim == 2 else value.transpose(2, 1, 0)
        if leaf in ("kernel", "scale", "embedding"):
            leaf = "weight"
        state[".".join([*parents, leaf])] = value
    return state


def write_flax_msgpack(state: dict[str, np.ndarray], path: Path) -> None:
    """Writes canonical tensors under HF's Flax names (for conversion and tests)."""
    from flax.serialization import msgpack_serialize

    flat = {}
    for name, value in state.items():
        *parents, leaf = name.split(".")
        owner = parents[-1] if parents else ""  # top-level tensors (e.g. layer_weights) keep their name
        norm = owner.endswith(("layer_norm", "_ln"))
        if leaf == "weight":
            if value.ndim in (2, 3) and not owner.startswith("embed_"):
                value = value.T if value.ndim == 2 else value.transpose(2, 1, 0)
                leaf = "kernel"
            elif owner.startswith("embed_"):
                leaf = "embedding"
            elif norm:
                leaf = "scale"
        flat["/".join([*parents, leaf])] = np.asarray(value)
    Path(path).write_bytes(msgpack_serialize(unflatten(flat)))
