"""Loading a model directory into a :class:`WhisperModel`: reading and checking its files, the
dtype policy, and laying the weights out for the device. Where a name resolves to a directory
is :mod:`whisperjax_cli.hub`; the Linen modules are :mod:`whisperjax_cli.model`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np

from whisperjax_cli.dims import ModelDimensions
from whisperjax_cli.errors import ModelError
from whisperjax_cli.hub import BUNDLED, PICKLES, resolve_model

@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """What a model directory holds, read and checked (arrays in canonical HF layout)."""

    path: Path
    dims: ModelDimensions
    state: dict[str, np.ndarray]
    config: dict[str, Any]
    generation: dict[str, Any]
    kind: str  # "ctranslate2" | "safetensors" | "flax"


MAX_JSON_BYTES = 16 << 20  # a model's JSON files are kilobytes (tokenizer.json: ~2 MB)


def _read_json(path: Path) -> dict:
    """A JSON object from ``path`` ({} when absent); anything else is a ModelError."""
    if not path.exists():
        return {}
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ModelError(path, f"larger than {MAX_JSON_BYTES >> 20} MB: not a model config")
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ModelError(path, f"invalid JSON ({type(err).__name__})") from None
    except OSError as err:
        raise ModelError(path, f"cannot read: {err.strerror or err}") from None
    if not isinstance(value, dict):
        raise ModelError(path, f"must hold a JSON object, not a {type(value).__name__}")
    return value


def read_model_dir(path: Path, float32: bool = True) -> ModelFiles:
    """Reads weights and configs from a CTranslate2, HF safetensors or HF Flax directory.

    Every tensor comes back float32; with ``float32=False`` float16 weights stay float16 (as
    stored), for :func:`load_model`, which casts each tensor once into its final layout.
    """
    from whisperjax_cli import weights

    path = Path(path)
    config = _read_json(path / "config.json")
    generation = _read_json(path / "generation_config.json")
    if (path / "model.bin").exists():
        tensors, aliases = weights.read_ct2(path / "model.bin")
        state, dims = weights.ct2_to_state(tensors, aliases, path / "model.bin", float32)
        # CTranslate2's config.json holds generation fields, not HF dimensions.
        generation = {**config, **generation}
        return ModelFiles(path, dims, state, {}, generation, "ctranslate2")
    safetensors = (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists()
    msgpack = (path / "flax_model.msgpack").exists()
    if not safetensors and not msgpack:
        if any((path / p).exists() for p in PICKLES):
            raise ModelError(path, "only pickle weights (pytorch_model.bin) found; wjx never unpickles. "
                             "Use a model.safetensors, flax_model.msgpack or CTranslate2 model.bin")
        raise ModelError(path, "no weights found (model.bin, model.safetensors or flax_model.msgpack)")
    if not config:
        raise ModelError(path, "config.json is missing")
    try:  # before any weight is read: a config claiming 10^6 layers is refused at once
        dims = ModelDimensions.from_hf_config(config)
    except ValueError as err:
        raise ModelError(path / "config.json", f"not a Whisper config: {err}") from None
    if safetensors:
        state, kind = weights.read_safetensors(path, float32), "safetensors"
    else:
        state, kind = weights.read_flax_msgpack(path / "flax_model.msgpack"), "flax"
    return ModelFiles(path, dims, state, config, generation, kind)


@dataclasses.dataclass(frozen=True)
class WhisperSpec:
    """The :class:`~whisperjax_cli.model.Whisper` network of these dimensions and dtypes, as the
    programs' static argument (hashable, equal when the networks are): it builds the Linen
    module only when a program is traced (``apply``), so a run whose programs are all read back
    from disk (:mod:`whisperjax_cli.programs`) never imports Flax (~0.2 s of a warm start-up)."""

    dims: ModelDimensions
    dtype: Any
    matmul_dtype: Any = None
    stream_rows: int = 0  # see whisperjax_cli.runtime.stream_rows

    @functools.cached_property
    def network(self):
        from whisperjax_cli.model import Whisper

        return Whisper(self.dims, self.dtype, self.matmul_dtype, self.stream_rows)

    def apply(self, variables, *args, **kwargs):
        """``Whisper(...).apply``; name the method as a string (``method="decode"``)."""
        return self.network.apply(variables, *args, **kwargs)


@dataclasses.dataclass(eq=False)
class WhisperModel:
    """A loaded model: dimensions, parameters (already in the compute dtype), tokenizer, settings."""

    name: str
    path: Path
    dims: ModelDimensions
    params: Any
    dtype: Any
    tokenizer: Any
    n_mels: int
    alignment_heads: Optional[np.ndarray]
    config: dict
    matmul_dtype: Any = None  # see whisperjax_cli.model.mixed_matmul
    stream_rows: int = 0  # see whisperjax_cli.runtime.stream_rows

    @property
    def module(self) -> "WhisperSpec":
        return WhisperSpec(self.dims, self.dtype, self.matmul_dtype, self.stream_rows)

    @property
    def is_multilingual(self) -> bool:
        return self.dims.is_multilingual


MIXED = "mixed"  # float32 compute, bfloat16 weights and products where they pay (model.mixed_matmul)


def cpu_has_bfloat16_dot() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX-BF16), where
    XLA runs a bfloat16 GEMM about twice as fast as a float32 one (without them it is slower)."""
    from whisperjax_cli.runtime import cpu_flags

    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def throughput_dtype(device: Optional[str] = None) -> Optional[str]:
    """The dtype batched transcription picks when none is given: :data:`MIXED` on a CPU with
    bfloat16 dot instructions, None (``load_model``'s default) elsewhere. Told without JAX."""
    on_cpu = _guess_dtype(None, device) == np.float32
    return MIXED if on_cpu and cpu_has_bfloat16_dot() else None


def default_dtype():
    """float32 on CPU; bfloat16 on accelerators."""
    import jax
    import jax.numpy as jnp

    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def _laid_out(path: Path, dtype, spare: int = 0) -> tuple[ModelFiles, dict]:
    """The model's files, and its parameter tree as numpy arrays already cast to ``dtype`` and
    laid out for the device (no JAX needed: this can run before JAX is imported). ``spare``:
    cores left to other work (the import running beside it). ``dtype`` :data:`MIXED` stores
    the weights :func:`~whisperjax_cli.weights.is_mixed_weight` names in bfloat16, the rest float32."""
    import ml_dtypes

    from whisperjax_cli import weights

    files = read_model_dir(path, float32=False)
    flat = weights.flatten(weights.params_from_state(files.state, files.dims, str(path)))
    # Cast and lay out every tensor in numpy (on a few threads: numpy lets go of the GIL while
    # it copies); load_model then moves the whole tree in one transfer, and on CPU the aligned
    # buffers are adopted, not copied. One jnp.asarray per tensor cost ~0.1 s for tiny.en.
    names = sorted(flat, key=lambda k: -flat[k].size)  # biggest first
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(max(1, min(4, workers - spare))) as pool:
        def cast(k):
            if str(dtype) != MIXED:
                return weights.device_layout(flat[k], dtype)
            mixed = weights.is_mixed_weight(tuple(k.split("/")))
            return weights.device_layout(flat[k], np.dtype(ml_dtypes.bfloat16) if mixed else np.float32)

        done = dict(zip(names, pool.map(cast, names)))
    return files, weights.unflatten({k: done[k] for k in flat})


def _guess_dtype(dtype, device: Optional[str]):
    """The numpy dtype :func:`load_model` will cast to (or :data:`MIXED`), worked out without
    importing JAX; None when that cannot be told yet (an accelerator plugin is installed and no
    device named)."""
    if dtype is None:
        platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
        if device is None and platforms in ("", "cpu"):
            plugins = ("jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu")
            on_cpu = platforms == "cpu" or all(importlib.util.find_spec(p) is None for p in plugins)
            device = "cpu" if on_cpu else None
        if device is None:
            return None
        dtype = "float32" if device == "cpu" else "bfloat16"
    name = str(getattr(dtype, "__name__", dtype))
    if name == MIXED:
        return MIXED
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name in ("float32", "float16"):
        return np.dtype(name)
    return None


@dataclasses.dataclass(frozen=True)
class PendingRead:
    """A model's files being read and laid out on a background thread (:func:`read_ahead`)."""

    path: Path
    storage: Any  # the numpy dtype (or MIXED) the weights are cast to
    future: Any  # concurrent.futures.Future of (ModelFiles, host parameter tree)

    def take(self, path: Path, storage) -> Optional[tuple[ModelFiles, dict]]:
        """The result for ``path`` and ``storage`` (waiting for it), or None if it is for
        another model or dtype, or failed (load_model then reads again and raises itself)."""
        if self.path != path or _dtype_key(self.storage) != _dtype_key(storage):
            return None
        try:
            return self.future.result()
        except Exception:  # noqa: BLE001
            return None


def read_ahead(name_or_path: str, dtype: Any = None, device: Optional[str] = None) -> Optional[PendingRead]:
    """Starts reading a model's weights and laying them out on a background thread, for the
    :func:`load_model` call given the returned handle; meant to run before JAX is imported
    (the CLI calls it first), so that the ~0.2 s of numpy copies overlap the ~0.5 s of JAX's import.

    Only what can be told without JAX is done; anything unusual (a Hub id, Flax msgpack
    weights, an accelerator whose dtype is not known yet, any error) is left to load_model,
    which then reads the files itself and raises as it always does. Returns None then.
    """
    import threading
    from concurrent.futures import Future

    try:
        guessed = _guess_dtype(dtype, device)
        path = Path(name_or_path).expanduser()
        if guessed is None or (not path.is_dir() and name_or_path not in BUNDLED):
            return None
        path = resolve_model(name_or_path)
        if (path / "model.bin").exists():
            import mmap  # noqa: F401 - imported here: the thread below imports nothing
        elif (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
            import safetensors.numpy  # noqa: F401
        else:
            return None
        from whisperjax_cli import weights  # noqa: F401
    except Exception:  # noqa: BLE001 - load_model will say what is wrong
        return None
    future: Future = Future()

    def work():
        try:
            # One core is left to the main thread, whose import of JAX is the critical path.
            future.set_result(_laid_out(path, guessed, spare=1))
        except BaseException as err:  # noqa: BLE001 - load_model reads the files again and raises
            future.set_exception(err)

    threading.Thread(target=work, name="wjx-read-ahead", daemon=True).start()
    return PendingRead(path, guessed, future)


def _dtype_key(dtype):
    return MIXED if str(dtype) == MIXED else np.dtype(dtype)


def load_model(name_or_path: str = "tiny.en", dtype: Any = None, pending: Optional[PendingRead] = None
               ) -> WhisperModel:
    """Loads a Whisper model by local path, bundled alias or Hub id.

    Args:
      name_or_path: a model directory, ``tiny.en``/``base`` (bundled), or a Hub id.
      dtype: compute dtype (``"float32"``, ``"bfloat16"``, ``"float16"`` or a jnp dtype);
        defaults to float32 on CPU and bfloat16 on accelerators. Weights are cast once here.
        ``"mixed"``: float32 activations, with the encoder's products, the output
        projection and the decoder's products over many rows (prompt, audio keys/values) in
        bfloat16 (the first two's weights stored so, float32 accumulation): ~1.7x faster
        encoding on a CPU with bfloat16 dot instructions (:func:`cpu_has_bfloat16_dot`),
        ~1 % relative error in the encoder's output. Batched CLI runs choose it there.
      pending: what :func:`read_ahead` started for this model, if anything (used when it is
        for the same files and dtype).
    Raises:
      ModelError: when the model cannot be found, read or validated.
    """
    import jax
    import jax.numpy as jnp

    from whisperjax_cli.runtime import default_device, stream_rows
    from whisperjax_cli.tokenizer import load_tokenizer

    mixed = str(dtype) == MIXED
    storage = MIXED if mixed else (jnp.dtype(dtype) if dtype is not None else jnp.dtype(default_dtype()))
    dtype = jnp.dtype(jnp.float32) if mixed else storage
    path = resolve_model(name_or_path)
    preloaded = pending.take(path, storage) if pending is not None else None
    files, host_params = preloaded if preloaded is not None else _laid_out(path, storage)
    params = jax.device_put(host_params)
    tokenizer = load_tokenizer(
        path, multilingual=files.dims.is_multilingual, num_languages=files.dims.num_languages
    )
    heads = files.generation.get("alignment_heads")
    return WhisperModel(
        name=name_or_path,
        path=path,
        dims=files.dims,
        params=params,
        dtype=dtype,
        tokenizer=tokenizer,
        n_mels=files.dims.n_mels,
        alignment_heads=None if heads is None else np.asarray(heads, np.int32),
        config=files.config,
        matmul_dtype=jnp.bfloat16 if mixed else None,
        stream_rows=stream_rows(default_device().platform),
    )
