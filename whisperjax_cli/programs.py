"""Jitted functions whose programs are kept on disk as exported StableHLO, so that a new
process skips tracing and lowering them, and can read them back while it is still importing.

JAX's persistent compilation cache only skips XLA's compile: every new process still traces a
function and lowers it to find its cached program (tiny.en's ``decode_window`` and ``encode``:
~0.45 s of a 2.4 s warm run on a 3 s clip). :func:`stored_jit` is ``jax.jit`` that also writes
each program it makes as a :mod:`jax.export` artifact next to JAX's cache
(``wjx-program-<name>-<sha256>``), keyed by everything that decides the program: this package's
source, the static arguments, the shapes and dtypes of the others, the JAX, jaxlib and Flax
versions, the backend and device kind, XLA's flags and JAX's trace settings. A later process
reads it back (a flatbuffer holding MLIR bytecode: data, never unpickled or imported) and
compiles it, which the persistent cache then serves.

:func:`prefetch` (the CLI calls it once JAX is up) reads back, on a background thread, the
programs the previous run in the same folder began with, while the main thread imports Flax and
the model and reads the weights. Programs read back are kept in :data:`_READ`, by file name: like
``jax.jit``'s own cache, a process-wide table of immutable programs named by their content's key.

Without a compile cache folder (``--no-compile-cache``, the tests), inside a trace, and for
arguments on several devices or on another device than the default, it is plain ``jax.jit``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Optional

import jax

PREFIX = "wjx-program-"
FIRST = "wjx-programs-first-"  # + environment hash: the programs a run began with, one per line
FIRST_COUNT = 8  # how many of a run's first programs are remembered (a batched run uses 5-7)
_FORMAT = "1"  # bump when the key or the files' layout changes
WAIT_EVENT = "/wjx/programs/wait_duration"  # jax.monitoring: time spent waiting for a read-ahead
_PLAIN = object()  # a key whose program could not be exported: plain jax.jit serves it


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    """This package's source: a stored program is only reused by the code that made it."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _flax_version() -> str:
    """Flax's version without importing Flax (~0.2 s that a warm start-up overlaps)."""
    from importlib.util import find_spec

    spec = find_spec("flax")
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    try:
        return (folder / "version.py").read_text() if folder else ""
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def _environment() -> str:
    """What decides a program besides the function and its arguments (fixed for a process)."""
    import jaxlib

    from whisperjax_cli.runtime import default_device

    device = default_device()
    settings = (jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision,
                jax.config.jax_default_prng_impl, jax.config.jax_numpy_rank_promotion)
    return repr((_FORMAT, jax.__version__, jaxlib.__version__, _flax_version(), device.client.platform,
                 device.client.platform_version, device.device_kind, jax.device_count(),
                 os.environ.get("XLA_FLAGS", ""), os.environ.get("LIBTPU_INIT_ARGS", ""), settings,
                 _source_hash()))


def store_folder() -> Optional[Path]:
    """JAX's persistent cache folder (set by :func:`~whisperjax_cli.runtime.enable_compile_cache`), or None."""
    folder = jax.config.jax_compilation_cache_dir
    return Path(folder) if folder else None


def exportable(cls: type) -> type:
    """Lets a pytree dataclass whose fields are all arrays (or None), registered with
    ``jax.tree_util.register_dataclass`` (:func:`~whisperjax_cli.decode_types.pytree_dataclass`),
    cross a stored program's boundary (:func:`jax.export.register_pytree_node_serialization`)."""
    jax.export.register_pytree_node_serialization(
        cls, serialized_name=f"{cls.__module__}.{cls.__qualname__}",
        serialize_auxdata=lambda aux: b"", deserialize_auxdata=lambda data: ())
    return cls


def _aval(leaf) -> tuple:
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"not an array: {type(leaf).__name__}")
    return tuple(shape), str(dtype), bool(getattr(leaf, "weak_type", False))


def _on_default_device(leaves) -> bool:
    """True when no leaf is traced or placed anywhere but the default device."""
    from whisperjax_cli.runtime import default_device

    default = None
    for leaf in leaves:
        if isinstance(leaf, jax.core.Tracer):
            return False
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            continue  # numpy: placed by the call
        default = default or default_device()
        if sharding.device_set != {default}:
            return False
    return True


_SKIP_LAPACK = threading.local()  # .on: the program being lowered on this thread calls no LAPACK routine


def _lapack_on_demand() -> None:
    """Makes JAX set up LAPACK for an exported CPU program only when the program calls it.

    JAX does it before lowering any (``jax._src.export._export._ensure_backends_initialized``),
    which imports SciPy's BLAS: 0.15 s of a warm start-up, for programs that name no LAPACK
    routine. Only this thread's lowering of such a program (:data:`_SKIP_LAPACK`) skips it;
    where JAX has no such function any more, nothing changes.
    """
    try:
        from jax._src.export import _export
    except ImportError:
        return
    original = getattr(_export, "_ensure_backends_initialized", None)
    if original is None or getattr(original, "wjx_on_demand", False):
        return

    def ensure(platforms):
        if not getattr(_SKIP_LAPACK, "on", False):
            original(platforms)

    ensure.wjx_on_demand = True
    _export._ensure_backends_initialized = ensure


def _options(name: str) -> Optional[dict]:
    """XLA options for the program ``name`` on this process's device and CPU
    (:func:`~whisperjax_cli.runtime.program_options`); None for XLA's defaults."""
    from whisperjax_cli.runtime import default_device, program_options

    return program_options(name, default_device().platform) or None


def _compile(exported: jax.export.Exported) -> Callable:
    """The exported program compiled for this process (the persistent cache serves it when warm)."""
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type) for a in exported.in_avals]
    args, kwargs = jax.tree_util.tree_unflatten(exported.in_tree, specs)

    def call(*args, **kwargs):
        return exported.call(*args, **kwargs)

    call.__name__ = call.__qualname__ = exported.fun_name  # JAX's cache entries: jit_<name>-<key>
    _lapack_on_demand()
    _SKIP_LAPACK.on = b"lapack" not in bytes(exported.mlir_module_serialized)
    try:
        return jax.jit(call, compiler_options=_options(exported.fun_name)).lower(*args, **kwargs).compile()
    finally:
        _SKIP_LAPACK.on = False


def _read(path: Path) -> Optional[Callable]:
    """The program stored at ``path`` compiled, or None when it is missing or unreadable."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        return _compile(jax.export.deserialize(bytearray(data)))
    except Exception:  # noqa: BLE001 - damaged, foreign or stale: made again by the caller
        return None


class _Programs:
    """Programs read back from disk by file name (filled ahead by :func:`prefetch`), and the
    names this process asked for first, remembered for the next run."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: dict[str, Future] = {}
        self._first: list[str] = []
        self.remembered: Optional[list[str]] = None  # what the manifest held when prefetch read it
        self.tag = ""  # what the run loads (prefetch's tag): each has its own manifest

    def take(self, path: Path) -> Optional[Callable]:
        """The program at ``path``: the one being read ahead (waiting for it), or read now."""
        with self._lock:
            pending = self._pending.pop(path.name, None)
        if pending is None:
            return _read(path)
        start = time.perf_counter()
        program = pending.result()
        jax.monitoring.record_event_duration_secs(WAIT_EVENT, time.perf_counter() - start)
        return program

    def fetch(self, folder: Path, names: list[str]) -> None:
        futures = {name: Future() for name in names}
        with self._lock:
            self._pending.update(futures)

        def work():
            from whisperjax_cli import decode_types  # noqa: F401 - registers the pytrees programs name

            for name, future in futures.items():
                future.set_result(_read(folder / name))

        threading.Thread(target=work, name="wjx-programs", daemon=True).start()

    def note(self, folder: Path, name: str) -> None:
        """Remembers ``name`` among this process's first programs, in the folder's manifest."""
        with self._lock:
            if len(self._first) >= FIRST_COUNT or name in self._first:
                return
            self._first.append(name)
            first = list(self._first)
        if self.remembered is None or first != self.remembered[: len(first)]:
            _write(_manifest(folder), "\n".join(first).encode())


_READ = _Programs()


def _manifest(folder: Path) -> Path:
    key = f"{_environment()}\0{_READ.tag}"
    return folder / f"{FIRST}{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def prefetch(tag: str = "") -> None:
    """Starts reading back, on a background thread, the programs the last run in this compile
    cache folder with the same ``tag`` began with (nothing without a folder); a call that needs
    one waits for it. ``tag`` names what the run loads (the model as given): a run of tiny.en
    after one of base read back base's programs, 2.3 s of loading that the run never used,
    then loaded its own on the main thread."""
    folder = store_folder()
    if folder is None:
        return
    _READ.tag = tag
    try:
        names = _manifest(folder).read_text().split()
    except (OSError, UnicodeDecodeError):
        names = []
    names = [n for n in names if n.startswith(PREFIX) and "/" not in n][:FIRST_COUNT]
    _READ.remembered = names
    if names:
        _READ.fetch(folder, names)


class StoredJit:
    """``jax.jit(fn, static_argnames=...)`` with its programs kept on disk (see the module)."""

    def __init__(self, fn: Callable, static_argnames: tuple[str, ...]):
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._jit_made: Optional[Callable] = None  # made at the first call (its options need the device)
        self._nested = jax.jit(fn, static_argnames=static_argnames)  # inside a trace: no options
        self._names = list(inspect.signature(fn).parameters)
        self._static = frozenset(static_argnames)
        self._programs: dict = {}
        self._lock = threading.Lock()
        self._jit_lock = threading.Lock()

    @property
    def _jit(self):
        """``jax.jit`` of the function, with the XLA options of its name (:func:`_options`)."""
        if self._jit_made is None:
            with self._jit_lock:
                if self._jit_made is None:
                    self._jit_made = jax.jit(self._fn, static_argnames=tuple(self._static),
                                             compiler_options=_options(self.__name__))
        return self._jit_made

    def _plain(self, *args, **kwargs):
        """Plain ``jax.jit``: with the program's XLA options at top level, without them inside
        another trace (``shard_map``, an enclosing jit), where JAX takes no compiler options."""
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves((args, kwargs))):
            return self._nested(*args, **kwargs)
        return self._jit(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        folder = store_folder()
        if folder is None:
            return self._plain(*args, **kwargs)
        statics = {self._names[i]: a for i, a in enumerate(args) if self._names[i] in self._static}
        statics.update((k, v) for k, v in kwargs.items() if k in self._static)
        dyn_args = tuple(a for i, a in enumerate(args) if self._names[i] not in self._static)
        dyn_kwargs = {k: v for k, v in kwargs.items() if k not in self._static}
        leaves, treedef = jax.tree_util.tree_flatten((dyn_args, dyn_kwargs))
        if not _on_default_device(leaves):
            return self._plain(*args, **kwargs)
        try:
            key = (treedef, tuple(_aval(leaf) for leaf in leaves), tuple(sorted(statics.items())))
        except TypeError:  # a Python scalar or other non-array argument
            return self._plain(*args, **kwargs)
        program = self._programs.get(key)
        if program is None:
            with self._lock:
                program = self._programs.get(key)
                if program is None:
                    program = self._programs[key] = self._load(folder, key, args, kwargs)
        if program is _PLAIN:
            return self._plain(*args, **kwargs)
        return program(*dyn_args, **dyn_kwargs)

    def _load(self, folder: Path, key, args, kwargs):
        treedef, avals, statics = key
        text = repr((self.__name__, str(treedef), avals, statics, _environment()))
        path = folder / f"{PREFIX}{self.__name__}-{hashlib.sha256(text.encode()).hexdigest()}"
        program = _READ.take(path)
        if program is None:
            try:
                exported = jax.export.export(self._jit)(*args, **kwargs)
            except Exception:  # noqa: BLE001 - e.g. a custom call JAX will not export: not stored
                return _PLAIN
            _write(path, exported.serialize())
            program = _compile(exported)
        _READ.note(folder, path.name)
        return program

    def _cache_size(self) -> int:
        """Programs made or read in this process (as ``jax.jit``'s ``_cache_size``)."""
        plain = self._nested._cache_size() + (self._jit_made._cache_size() if self._jit_made is not None else 0)
        return plain + sum(p is not _PLAIN for p in self._programs.values())


def stored_jit(*, static_argnames: tuple[str, ...] = ()) -> Callable[[Callable], StoredJit]:
    """Decorator: :class:`StoredJit` of the function."""
    return lambda fn: StoredJit(fn, static_argnames)


def _write(path: Path, data: bytes) -> None:
    """Writes ``data`` at ``path`` whole or not at all (other processes may read it meanwhile);
    a folder that cannot be written only costs the next process the time to make it again."""
    from whisperjax_cli.writers import write_atomic

    try:
        write_atomic(path, data)
    except OSError:
        pass
