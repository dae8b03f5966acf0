"""Process set-up before JAX starts: CPU threads, the device, the persistent compile cache.

Compiled programs are JAX's own: each jitted function keeps its programs in memory, and JAX's
persistent compilation cache keeps them on disk across processes (serialized XLA executables,
read by XLA itself; nothing in the cache folder is ever unpickled or imported by wjx).

XLA reads its flags and the platform list once, when JAX first initialises a backend, so
:func:`configure` must run before anything touches ``jax`` (the CLI calls it first thing in
a command, after parsing). Called again in a process where JAX is already running (tests,
notebooks), it only checks and applies what can still change.
"""

from __future__ import annotations

import os
import sys
from functools import update_wrapper as functools_wraps
from pathlib import Path
from typing import Optional

from whisperjax_cli.errors import UsageError

DEVICES = ("cpu", "gpu", "tpu")
# What each --device choice means to JAX_PLATFORMS ("gpu" is JAX's alias for cuda/rocm).
_PLATFORMS = {"cpu": "cpu", "gpu": "gpu", "tpu": "tpu"}
_INSTALL_HINT = {
    "cpu": "is JAX_PLATFORMS set?",
    "gpu": "it needs an NVIDIA GPU and pip install 'whisperjax-cli[cuda12]'; or use --device cpu",
    "tpu": "it needs a TPU VM and pip install 'whisperjax-cli[tpu]'; or use --device cpu",
}


def compile_cache_dir() -> Path:
    """Where compiled XLA programs are kept: ``<wjx cache dir>/jax``."""
    from whisperjax_cli.hub import cache_dir

    return cache_dir() / "jax"


def compile_cache_disabled(no_compile_cache: bool = False) -> bool:
    """True when ``--no-compile-cache`` is given or ``WJX_NO_COMPILE_CACHE`` is 1/true/yes."""
    env = os.environ.get("WJX_NO_COMPILE_CACHE", "").strip().lower()
    return no_compile_cache or env in ("1", "true", "yes")


def limit_threads(threads: int) -> None:
    """Keeps XLA's CPU work on ``threads`` cores; effective only before JAX starts.

    XLA sizes its thread pools from the CPUs the process may run on, so the process is
    pinned to ``threads`` of them (Linux); with one thread Eigen's own pool is turned off.
    """
    if threads < 1:
        raise UsageError(None, f"--threads must be at least 1, not {threads}")
    if hasattr(os, "sched_setaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, allowed[:threads])
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_multi_thread_eigen" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()


def enable_compile_cache(path: Path) -> None:
    """Persists every compiled program under ``path`` so the next process skips compiling.

    The thresholds are lowered so that CPU programs, which compile in well under JAX's
    default one second and can be small, are written too. The folder is per device kind
    (``cpu``, ``gpu-<name>``...): JAX keys its entries by backend, but separate folders keep
    a shared cache folder tidy and let one be cleared alone.
    """
    import jax

    path.mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != str(path):
        jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def select_device(device: Optional[str]):
    """Checks that JAX can use ``device`` and makes it the default; returns the jax Device.

    Raises:
      UsageError: when no such device is available (exit code 2).
    """
    import jax

    if device is None:
        return jax.devices()[0]
    try:
        found = jax.devices(_PLATFORMS[device])
    except RuntimeError:
        raise UsageError(f"--device {device}", f"no {device.upper()} available to JAX ({_INSTALL_HINT[device]})") from None
    jax.config.update("jax_default_device", found[0])
    return found[0]


def configure(device: Optional[str] = None, threads: Optional[int] = None, compile_cache: bool = True):
    """Sets up threads, platform and compile cache, then starts JAX on ``device``.

    Args:
      device: ``"cpu"``, ``"gpu"``, ``"tpu"`` or None (JAX's own choice: an accelerator if any).
      threads: CPU threads for XLA, or None for all the process may use.
      compile_cache: keep compiled programs in :func:`compile_cache_dir` across runs.
    Returns:
      The jax Device that computations will run on.
    Raises:
      UsageError: bad ``threads``, or ``device`` not available.
    """
    if device is not None and device not in DEVICES:
        raise UsageError(None, f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    fresh = "jax" not in sys.modules
    if threads is not None and fresh:
        limit_threads(threads)
    if device is not None and fresh:
        # Only this platform is started, so a missing GPU plugin cannot slow or break start-up.
        os.environ["JAX_PLATFORMS"] = _PLATFORMS[device]
    try:
        selected = select_device(device)
    except RuntimeError as err:  # JAX_PLATFORMS set by the user to something absent
        raise UsageError("device", str(err).splitlines()[0]) from None
    if compile_cache:
        enable_compile_cache(compile_cache_dir() / device_folder(selected))
    return selected


def device_folder(device) -> str:
    """The compile cache's sub-folder for ``device``'s kind: ``cpu``, ``gpu-nvidia-h100-80gb-hbm3``..."""
    import re

    platform = "gpu" if device.platform in ("cuda", "rocm") else device.platform
    kind = re.sub(r"[^a-z0-9]+", "-", str(device.device_kind).lower()).strip("-")
    return platform if kind in ("", platform) else f"{platform}-{kind}"


def default_device():
    """The device an unplaced computation runs on (``jax_default_device`` may be a platform name)."""
    import jax

    device = jax.config.jax_default_device
    if device is None:
        return jax.devices()[0]
    return jax.devices(device)[0] if isinstance(device, str) else device
