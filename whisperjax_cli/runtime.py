"""Process set-up before JAX starts: CPU threads, the device, the persistent compile cache.

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
    from whisperjax_cli.models import cache_dir

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
    default one second and can be small, are written too.
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
        enable_compile_cache(compile_cache_dir())
    return selected


# ---------------------------------------------------------------- compiled programs kept whole on disk

_AOT_FORMAT = "wjx-aot-2"
_SOURCE_HASH: Optional[str] = None


def _source_hash() -> str:
    """Hash of this package's source: a cached program is only reused by the code that made it."""
    global _SOURCE_HASH
    if _SOURCE_HASH is None:
        import hashlib

        digest = hashlib.sha256()
        for path in sorted(Path(__file__).parent.glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        _SOURCE_HASH = digest.hexdigest()
    return _SOURCE_HASH


def _environment_key() -> str:
    """What else decides the compiled code: JAX and the backend, XLA flags, JAX's trace settings."""
    import re

    import flax
    import jax
    import jaxlib

    device = default_device()
    client = device.client
    try:
        from jax._src import config as jax_config

        context = re.sub(r" at 0x[0-9a-f]+", "", repr(jax_config.trace_context()))
    except Exception:  # noqa: BLE001 - private API: fall back to the public settings below
        context = ""
    settings = [jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision,
                jax.config.jax_default_prng_impl, jax.config.jax_numpy_rank_promotion]
    return repr((_AOT_FORMAT, jax.__version__, jaxlib.__version__, flax.__version__, client.platform,
                 client.platform_version, getattr(client, "runtime_type", ""), device.device_kind, device.id,
                 len(jax.devices()),
                 os.environ.get("XLA_FLAGS", ""), os.environ.get("LIBTPU_INIT_ARGS", ""), settings, context,
                 _source_hash()))


class CachedJit:
    """``jax.jit`` whose compiled programs also persist whole, next to JAX's compile cache.

    JAX's persistent cache only skips XLA's compile: every new process still traces the
    function and lowers it before it can look the program up, which for ``decode_window`` took
    longer than decoding a short clip (~0.7 s). Here a compiled program is kept as a
    serialized executable under the compile cache dir, keyed by everything that decides it
    (source of this package, static arguments, argument shapes and dtypes, JAX/jaxlib and
    backend versions, XLA flags, JAX's trace settings), and a later process loads it without
    tracing. Without a compile cache dir, or inside a trace, it is plain ``jax.jit``.

    The files are read with pickle (JAX's executable serialization); they are written only
    by wjx, in the same folder as the XLA executables JAX itself loads and runs, so they are
    no more trusted than those. Unreadable or stale files are ignored and rewritten.
    """

    def __init__(self, fn, static_argnames: tuple[str, ...] = ()):
        import inspect

        import jax

        functools_wraps(self, fn)
        self._jit = jax.jit(fn, static_argnames=static_argnames)
        self._signature = inspect.signature(fn)
        self._static = frozenset(static_argnames)
        self._compiled: dict = {}
        self._names: dict = {}  # key -> file name of the kept program
        self._name = f"{fn.__module__}.{fn.__qualname__}"
        _instances.append(self)

    def __getattr__(self, name):  # lower, trace, eval_shape, clear_cache ... of the jitted function
        return getattr(self._jit, name)

    def _cache_size(self) -> int:
        return self._jit._cache_size() + len(self._compiled)

    def __call__(self, *args, **kwargs):
        import jax
        import numpy as np

        cache = jax.config.jax_compilation_cache_dir
        if not cache or not jax.config.jax_enable_compilation_cache:
            return self._jit(*args, **kwargs)
        device = {default_device()}
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        statics = tuple((k, v) for k, v in bound.arguments.items() if k in self._static)
        dynamic = [v for k, v in bound.arguments.items() if k not in self._static]
        leaves, treedef = jax.tree_util.tree_flatten(dynamic)
        avals = []
        for leaf in leaves:
            if isinstance(leaf, jax.core.Tracer) or (isinstance(leaf, jax.Array) and leaf.devices() != device):
                return self._jit(*args, **kwargs)  # inside a trace, or placed elsewhere: plain jit
            if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
                avals.append((leaf.shape, str(leaf.dtype), bool(getattr(leaf, "weak_type", False))))
            else:  # a Python scalar
                avals.append((type(leaf).__name__,))
        key = (treedef, tuple(avals), statics)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = self._load_or_compile(Path(cache), key, bound)
        if _speculated:
            done = _take_speculated(self._names.get(key), dynamic)
            if done is not None:
                return done
        return compiled(*dynamic)

    def _load_or_compile(self, folder: Path, key, bound):
        import hashlib

        treedef, avals, statics = key
        digest = hashlib.sha256(repr((self._name, str(treedef), avals, statics, _environment_key())).encode())
        path = folder / f"wjx-aot-{self._name.rsplit('.', 1)[-1]}-{digest.hexdigest()}"
        self._names[key] = path.name
        compiled = _take_prefetched(path.name)
        if compiled is None and path.exists():
            try:
                compiled = _load_program(path.read_bytes())
            except Exception:  # noqa: BLE001 - a damaged or foreign file: compile again below
                compiled = None
        if compiled is not None:
            _note_use(path.name)
            return compiled
        compiled, fresh = _compile(self._jit, bound)
        if not fresh:
            # XLA:CPU loses code when it serializes an executable that was itself loaded from
            # JAX's cache (the copy fails at run time: "Function ... not found"), so such a
            # program is compiled once more, past JAX's cache, to be kept whole.
            compiled_again, fresh = _compile_past_jax_cache(self._jit, bound)
            if fresh:
                compiled = compiled_again
        if fresh:
            try:
                _write_atomic(path, _program_bytes(compiled))
                _note_use(path.name)
            except Exception:  # noqa: BLE001 - not serializable here, or a read-only cache: keep it in memory
                pass
        return compiled


_instances: list = []  # every CachedJit (module-level functions: a handful)


def clear_programs() -> None:
    """Drops every compiled program this process holds (ours and JAX's in-memory caches).

    XLA:CPU maps each program's code into memory; a process that compiles for many models,
    dtypes and modes in turn (a benchmark) otherwise keeps them all, and past ~65k mappings
    (Linux's ``vm.max_map_count``) the next compile fails ("LLVM compilation error: Cannot
    allocate memory"). The on-disk caches are kept, so the next call loads rather than compiles.
    """
    import jax

    for fn in _instances:
        fn._compiled.clear()
    jax.clear_caches()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _program_bytes(compiled) -> bytes:
    """A kept program: the serialized executable, and apart from it its argument and result
    trees (those may name classes of modules not imported yet; see :func:`prefetch_programs`)."""
    import pickle

    from jax.experimental import serialize_executable

    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    trees = pickle.dumps((in_tree, out_tree), protocol=pickle.HIGHEST_PROTOCOL)
    return pickle.dumps((_AOT_FORMAT, payload, trees), protocol=pickle.HIGHEST_PROTOCOL)


def _load_program(data: bytes):
    import pickle

    from jax.experimental import serialize_executable

    fmt, payload, trees = pickle.loads(data)
    if fmt != _AOT_FORMAT:
        raise ValueError(f"kept program format {fmt!r}")
    in_tree, out_tree = pickle.loads(trees)
    return serialize_executable.deserialize_and_load(payload, in_tree, out_tree, execution_devices=[default_device()])


# Programs that the last process of a model group used first are loaded on a background thread
# as soon as the model is named (load_model), while the weights load and the decoding modules
# import: XLA lets go of the GIL while it loads an executable (~0.2 s for tiny.en's two).
_PREFETCH_MAX = 3
_prefetched: dict = {}  # file name -> Future of (loaded executable, args info, no_kwargs, trees)
_index: dict = {"group": None, "saved": [], "used": []}


def prefetch_programs(group: str) -> None:
    """Starts loading, in the background, the kept programs that the last process of ``group``
    (e.g. a model path and dtype) used first; :class:`CachedJit` takes them when asked for."""
    import hashlib
    import threading
    from concurrent.futures import Future

    import jax

    folder = jax.config.jax_compilation_cache_dir
    if not folder or not jax.config.jax_enable_compilation_cache:
        return
    folder = Path(folder)
    index = folder / f"wjx-aot-recent-{hashlib.sha256(group.encode()).hexdigest()[:16]}"
    try:
        saved = index.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        saved = []
    _index.update(group=index, saved=saved, used=[])
    todo = {name: Future() for name in saved[:_PREFETCH_MAX] if name not in _prefetched}
    if not todo:
        return
    _prefetched.update(todo)
    device = default_device()

    def load_all():
        for name, future in todo.items():
            try:
                future.set_result(_preload(folder / name, device))
            except BaseException:  # noqa: BLE001 - the caller loads it itself
                future.set_result(None)

    threading.Thread(target=load_all, name="wjx-prefetch", daemon=True).start()


def _preload(path: Path, device):
    """The heavy half of loading a kept program, safe off the main thread: it imports nothing
    (a class from a module not imported yet makes it give up), so it cannot race the main
    thread's imports."""
    import io
    import pickle

    from jax.experimental import serialize_executable

    class NoImports(_NoImports, serialize_executable._JaxPjrtUnpickler):
        pass

    fmt, payload, trees = pickle.loads(path.read_bytes())  # a tuple of str and bytes
    if fmt != _AOT_FORMAT:
        return None
    unloaded, args_info_flat, no_kwargs = NoImports(io.BytesIO(payload), device.client, [device]).load()
    return unloaded.load(), args_info_flat, no_kwargs, trees


def _take_prefetched(name: str):
    """The program ``name`` if the background thread loaded it (waiting for it if under way)."""
    import pickle

    import jax

    future = _prefetched.pop(name, None)
    done = future.result() if future is not None else None
    if done is None:
        return None
    loaded, args_info_flat, no_kwargs, trees = done
    try:  # as serialize_executable.deserialize_and_load finishes
        in_tree, out_tree = pickle.loads(trees)
        return jax.stages.Compiled(loaded, [], in_tree.unflatten(args_info_flat), out_tree, no_kwargs=no_kwargs)
    except Exception:  # noqa: BLE001 - JAX changed inside: load it the public way
        return None


class _NoImports:
    """Unpickler mix-in: a class from a module not imported yet makes it give up instead of
    importing (a background thread importing races the main thread's imports)."""

    def find_class(self, module, name):
        import pickle

        if module not in sys.modules:
            raise pickle.UnpicklingError(f"{module} is not imported yet")
        return super().find_class(module, name)


# A first call started ahead: file name of the kept program -> Future of (argument leaves and
# tree, result) or None. See speculate.
_speculated: dict = {}


def speculate(fn_name: str, args: list) -> bool:
    """Starts, on a background thread, the first call the last process of this group made to
    the :class:`CachedJit` function ``fn_name`` (e.g. ``"encode"``), on ``args`` (its dynamic
    arguments, in order).

    Meant for start-up: the CLI runs the first window's encoder while the main thread still
    imports the decoding code. The program is the one :func:`prefetch_programs` is loading; the
    result goes only to the call that picks that very program with these very arguments (JAX
    arrays: the same objects; numpy arrays: equal values), so it is what that call would have
    computed. Any other call, or any failure here, computes as usual. Returns whether it started.
    """
    import threading
    from concurrent.futures import Future

    name = next((n for n in _index["saved"] if n.startswith(f"wjx-aot-{fn_name}-")), None)
    loading = _prefetched.get(name) if name is not None else None
    if loading is None or name in _speculated:
        return False
    future: Future = Future()
    _speculated[name] = future

    def run():
        try:
            future.set_result(_run_ahead(loading, args))
        except BaseException:  # noqa: BLE001 - the call itself computes it
            future.set_result(None)

    threading.Thread(target=run, name="wjx-speculate", daemon=True).start()
    return True


def _run_ahead(loading, args: list):
    import io
    import pickle

    import jax

    done = loading.result()
    if done is None:
        return None
    loaded, args_info_flat, no_kwargs, trees = done

    class Trees(_NoImports, pickle.Unpickler):
        pass

    in_tree, out_tree = Trees(io.BytesIO(trees)).load()
    compiled = jax.stages.Compiled(loaded, [], in_tree.unflatten(args_info_flat), out_tree, no_kwargs=no_kwargs)
    result = compiled(*args)
    return jax.tree_util.tree_flatten(list(args)), result


def _take_speculated(name, dynamic):
    """The result :func:`speculate` computed ahead for this call, or None (once per program)."""
    import jax

    future = _speculated.pop(name, None)
    done = future.result() if future is not None else None
    if done is None:
        return None
    (leaves, treedef), result = done
    now, now_treedef = jax.tree_util.tree_flatten(list(dynamic))
    if now_treedef != treedef or len(now) != len(leaves):
        return None
    return result if all(_same_value(a, b) for a, b in zip(now, leaves)) else None


def _same_value(a, b) -> bool:
    """Whether two argument leaves are one value: JAX arrays only when the very same object,
    numpy arrays and scalars, and Python scalars, when of one type and equal."""
    import numpy as np

    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, (np.ndarray, np.generic)):
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    return isinstance(a, (bool, int, float, complex)) and a == b


def _note_use(name: str) -> None:
    """Remembers the first programs of this process for the next one (see prefetch_programs)."""
    index = _index["group"]
    used = _index["used"]
    if index is None or name in used:
        return
    used.append(name)
    head = used[:_PREFETCH_MAX]
    if head != _index["saved"][: len(head)]:
        try:
            _write_atomic(index, " ".join(head).encode("ascii"))
            _index["saved"] = list(head)
        except OSError:
            pass


_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # XLA compile or JAX cache read
_JAX_CACHE_HIT = "/jax/compilation_cache/cache_hits"


def _compile(jitted, bound):
    """``jitted`` lowered and compiled for ``bound``; True with it when XLA really compiled it
    (not read from JAX's persistent cache, nor reused from this process's memory)."""
    import jax

    seen: set[str] = set()
    on_event = lambda event, *args, **kwargs: seen.add(event)  # noqa: E731
    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        compiled = jitted.lower(*bound.args, **bound.kwargs).compile()
    finally:
        jax.monitoring.unregister_event_listener(on_event)
        jax.monitoring.unregister_event_duration_listener(on_event)
    return compiled, _BACKEND_COMPILE in seen and _JAX_CACHE_HIT not in seen


def _compile_past_jax_cache(jitted, bound):
    """:func:`_compile` with JAX's persistent cache off and this process's caches cleared."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    jax.clear_caches()
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        return _compile(jitted, bound)
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        compilation_cache.reset_cache()


def default_device():
    """The device an unplaced computation runs on (``jax_default_device`` may be a platform name)."""
    import jax

    device = jax.config.jax_default_device
    if device is None:
        return jax.devices()[0]
    return jax.devices(device)[0] if isinstance(device, str) else device


def cached_jit(static_argnames: tuple[str, ...] = ()):
    """Decorator form of :class:`CachedJit`."""
    return lambda fn: CachedJit(fn, static_argnames)
