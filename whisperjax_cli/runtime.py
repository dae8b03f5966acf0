"""Process set-up before JAX starts: CPU threads, the device(s), the persistent compile cache,
and joining the other processes of a multi-host run (:func:`start_distributed`).

Compiled programs are JAX's own: each jitted function keeps its programs in memory, and JAX's
persistent compilation cache keeps them on disk across processes (serialized XLA executables,
read by XLA itself; nothing in the cache folder is ever unpickled or imported by wjx).

XLA reads its flags and the platform list once, when JAX first initialises a backend, so
:func:`configure` must run before anything touches ``jax`` (the CLI calls it first thing in
a command, after parsing). Called again in a process where JAX is already running (tests,
notebooks), it only checks and applies what can still change.
"""

from __future__ import annotations

import functools
import os
import sys
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


# The decode programs (by function name): a step of several rows (beams, batched windows,
# best-of samples), or of one in sequential greedy mode, which measured the same either way.
MULTI_ROW_PROGRAMS = frozenset({"decode_window", "beam_search_window"})
# XLA's option that picks which operations YNNPACK runs; empty: none (XLA's own kernels and Eigen).
YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``); empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def program_options(name: str, platform: str) -> dict:
    """XLA options to compile the program ``name`` with on ``platform`` and this CPU.

    On an x86 CPU with AVX2 but no AVX-512 (measured on an AMD EPYC Zen 3), the decode programs
    are compiled without YNNPACK: its kernel for a product of a few rows (5 beams, 8 windows)
    reads the weights in column strips, each load a matrix row from the last, and ran at
    5-8 GB/s where XLA's own kernels and Eigen reach 9-14 (AMD EPYC Zen 3, base, four A/B
    rounds: a beam-5 step 48-64 ms -> 41-53, an 8-row step 78-92 -> 52-66; a single row
    the same). The encoder keeps it (without it, one run: base 1306 ms a window against
    1070, tiny.en 515 against 553), and so does every program on a CPU with AVX-512, where
    the same change was measured mixed (issue #24's notes).
    """
    flags = cpu_flags()
    if platform == "cpu" and name in MULTI_ROW_PROGRAMS and "avx2" in flags and "avx512f" not in flags:
        return {YNN_FUSIONS: ""}
    return {}


STREAM_ROWS = 8  # see stream_rows


def stream_rows(platform: str) -> int:
    """Up to how many rows a decode step projects onto the vocabulary with
    :func:`~whisperjax_cli.model.few_rows_product` rather than XLA's product (0: never).

    Where the decode programs run on XLA's own kernels (:func:`program_options`: an x86 CPU
    with AVX2 but no AVX-512), those took ~4x one row's time for 2-8 rows (base: 5 rows 25.6 ms,
    one row 5.7, AMD EPYC Zen 3).
    Elsewhere (YNNPACK's kernels, GPUs, TPUs) the product is left to XLA: not measured there.
    """
    return STREAM_ROWS if any(program_options(name, platform) for name in MULTI_ROW_PROGRAMS) else 0


def programs_may_overlap(platform: str) -> bool:
    """Whether two compiled programs may run at the same time (batched mode encodes the next
    windows on a thread while a step decodes: :mod:`~whisperjax_cli.readahead`).

    Not where the decode programs run without YNNPACK (:func:`program_options`, or ``XLA_FLAGS``
    turning it off): there XLA's own kernels gave wrong tokens when an encode ran beside them
    (jax 0.10.2, AMD EPYC Zen 3, 2 cores: tiny.en and base, a batch of 5 or 8 windows; 45-110
    tokens of every row differed from its tokens alone; 1, 2 or 4 rows, one core, or YNNPACK's
    kernels: identical). On the long-form benchmark that was 10 looping windows in 27 instead of 1, and
    base's WER 19.7 % instead of 17.4.
    """
    if YNN_FUSIONS in os.environ.get("XLA_FLAGS", ""):
        return False
    return not any(program_options(name, platform) for name in MULTI_ROW_PROGRAMS)


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


def keep_freed_memory() -> None:
    """Asks glibc's allocator to keep freed memory for reuse rather than give it back at once.

    XLA's CPU buffers are plain ``malloc`` blocks; those above glibc's mmap threshold (at most
    32 MiB: an 8-window encoder activation is ~100) are mapped and unmapped at every call, and
    each page is faulted in again (base, batched, 12 min of speech: 4.6-7.0 M minor faults and
    18-28 s of system time on 2 cores; with this 1.2-2.6 M and 5-9 s, peak RSS +2 %). On two short
    clips it saved nothing and peak RSS rose 5-15 % (1.09-1.12 -> 1.17-1.25 GB): freed blocks are
    kept, not always the size the next call needs. A no-op off glibc.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt(m_mmap_max, 0)  # large blocks come from the heap, whose freed space is reused
    mallopt(m_trim_threshold, 2**31 - 1)  # and kept unless 2 GiB lie free at its top


def quiet_start() -> None:
    """Process settings of a wjx command's start-up, made before numpy is imported.

    * NumPy's OpenBLAS runs on one thread (unless ``OPENBLAS_NUM_THREADS`` is set): NumPy's
      products here are small (the mel filterbank's: 1.7 ms a window on one thread; language
      and label averages), and after a call its idle threads spin-wait: 5 % of a warm 3 s
      clip's CPU samples (~0.19 s, ``perf``, AMD EPYC Zen 3, 2 cores), beside XLA's threads.
    * Python's cyclic garbage collector is paused until :func:`start_up_done`: importing JAX
      leaves ~96,000 tracked objects, which each full collection walked again (3 % of the
      same run's samples, ~0.12 s).

    The CLI's own choice (like :func:`keep_freed_memory`), never a library import's.
    """
    import gc

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    gc.disable()


def start_up_done() -> None:
    """Ends :func:`quiet_start`'s pause of the garbage collector: the objects made so far
    (modules, the model) are frozen, out of every later collection, and collection resumes."""
    import gc

    if not gc.isenabled():
        gc.freeze()
        gc.enable()


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

    The device is one of this process's own (``jax.local_devices``): after
    ``jax.distributed.initialize``, ``jax.devices()`` lists every process's devices, and the
    first of them belongs to process 0. With one process the two lists are the same.

    Raises:
      UsageError: when no such device is available (exit code 2).
    """
    import jax

    if device is None:
        return jax.local_devices()[0]
    try:
        found = jax.local_devices(backend=_PLATFORMS[device])
    except RuntimeError:
        raise UsageError(f"--device {device}", f"no {device.upper()} available to JAX ({_INSTALL_HINT[device]})") from None
    jax.config.update("jax_default_device", found[0])
    return found[0]


def select_devices(device: Optional[str], count: Optional[int] = None) -> list:
    """This process's devices of ``device``'s platform (JAX's default platform when None) and
    of the first one's kind, for a data-parallel mesh; the first ``count`` of them, or all.

    Raises:
      UsageError: ``count`` below 1 or above what there is (exit code 2).
    """
    import jax

    first = select_device(device)
    same = [d for d in jax.local_devices(backend=first.platform) if d.device_kind == first.device_kind]
    if count is None:
        return same
    if not 1 <= count <= len(same):
        raise UsageError("--devices", f"must be from 1 to {len(same)} (the {first.platform} devices here), not {count}")
    return same[:count]


def prepare_process(device: Optional[str] = None, threads: Optional[int] = None) -> None:
    """What must happen before JAX starts a backend: the thread limit and the platform list.

    A no-op once ``jax`` is imported (XLA has read them by then). :func:`configure` and
    :func:`start_distributed` call it; ``device`` must be None or one of :data:`DEVICES`.
    """
    if "jax" in sys.modules:
        return
    if threads is not None:
        limit_threads(threads)
    if device is not None:
        # Only this platform is started, so a missing GPU plugin cannot slow or break start-up.
        os.environ["JAX_PLATFORMS"] = _PLATFORMS[device]


def start_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                      process_id: Optional[int] = None, *, device: Optional[str] = None,
                      threads: Optional[int] = None, timeout_s: int = 300) -> tuple[int, int]:
    """Joins a run of several processes (hosts): ``jax.distributed.initialize``.

    Must run before anything starts a JAX backend (the CLI calls it before :func:`configure`):
    afterwards each backend lists every process's devices. With every argument None, JAX finds
    the processes itself (SLURM, Open MPI, TPU pods). The processes exchange only small values
    through the coordination service's key-value store
    (:meth:`~whisperjax_cli.parallel_hosts.Processes.totals`) and never run a program
    together, so the CPU backend gets no cross-process collectives: with JAX's default, gloo,
    even a one-process sum over two CPU devices went through it and printed its connections
    on stdout, where results go.

    Args:
      coordinator: ``HOST:PORT`` of process 0's coordination service.
      num_processes, process_id: how many processes, and which this one is.
      device, threads: as :func:`configure` (applied first, before JAX starts).
      timeout_s: how long to wait for every process to join.
    Returns:
      ``(process_index, process_count)``.
    Raises:
      UsageError: an unknown ``device``, or the processes could not be joined.
    """
    if device is not None and device not in DEVICES:
        raise UsageError(None, f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    prepare_process(device, threads)
    import jax

    jax.config.update("jax_cpu_collectives_implementation", None)
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                                   initialization_timeout=timeout_s)
    except (RuntimeError, ValueError) as err:  # no coordinator reached, or no cluster detected
        raise UsageError("--coordinator", f"cannot join the other processes: {str(err).splitlines()[0]}") from None
    return jax.process_index(), jax.process_count()


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
    prepare_process(device, threads)
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
        return jax.local_devices()[0]
    return jax.local_devices(backend=device)[0] if isinstance(device, str) else device
