"""Programs kept on disk as exported StableHLO (whisperjax_cli.programs): read back by a new
process without tracing, made again whenever anything that decides them differs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from whisperjax_cli import programs
from whisperjax_cli.decode_types import DecodeInputs, DecodeOutput


@pytest.fixture
def store(monkeypatch, tmp_path):
    """A program folder of the test's own, and a fresh table of programs read back."""
    monkeypatch.setattr(programs, "store_folder", lambda: tmp_path)
    monkeypatch.setattr(programs, "_READ", programs._Programs())
    return tmp_path


def new_process(monkeypatch):
    """What a new process starts with: no program in memory, nothing read ahead."""
    monkeypatch.setattr(programs, "_READ", programs._Programs())


def stored(fn, traces: list, static=()):
    def counted(*args, **kwargs):
        traces.append(1)  # runs when JAX traces the function, never when a program is read back
        return fn(*args, **kwargs)

    counted.__name__ = fn.__name__
    return programs.StoredJit(counted, static)


def affine(x, scale, shift: int):
    return x * scale + shift


def files(folder, prefix=programs.PREFIX):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(prefix))


def test_a_program_is_read_back_without_tracing_and_made_again_when_its_key_differs(store, monkeypatch):
    traces = []
    x, scale = np.arange(3, dtype=np.float32), np.float32(2)
    first = np.asarray(stored(affine, traces, ("shift",))(x, scale, shift=1))
    assert traces == [1] and len(files(store)) == 1
    np.testing.assert_array_equal(first, [1, 3, 5])

    new_process(monkeypatch)
    again = stored(affine, traces, ("shift",))
    np.testing.assert_array_equal(again(x, scale, shift=1), first)
    assert traces == [1], "a stored program was traced again"
    # Another static value, shape or dtype is another program, traced and stored.
    np.testing.assert_array_equal(again(x, scale, shift=2), [2, 4, 6])
    np.testing.assert_array_equal(again(np.arange(4, dtype=np.float32), scale, shift=1), [1, 3, 5, 7])
    np.testing.assert_array_equal(again(x.astype(np.int32), np.int32(2), shift=1), [1, 3, 5])
    assert len(traces) == 4 and len(files(store)) == 4


def test_a_damaged_program_is_made_again(store, monkeypatch):
    traces = []
    x = np.arange(3, dtype=np.float32)
    stored(affine, traces, ("shift",))(x, np.float32(2), shift=1)
    (path,) = [store / name for name in files(store)]
    path.write_bytes(path.read_bytes()[:100])
    new_process(monkeypatch)
    np.testing.assert_array_equal(stored(affine, traces, ("shift",))(x, np.float32(2), shift=1), [1, 3, 5])
    assert len(traces) == 2 and len(path.read_bytes()) > 100  # traced again and stored whole


def test_inside_a_trace_or_without_a_folder_it_is_plain_jit(store, monkeypatch):
    traces = []
    program = stored(affine, traces, ("shift",))
    outer = jax.jit(lambda x: program(x, jnp.float32(2), shift=1))
    np.testing.assert_array_equal(outer(np.arange(3, dtype=np.float32)), [1, 3, 5])
    monkeypatch.setattr(programs, "store_folder", lambda: None)
    np.testing.assert_array_equal(program(np.arange(2, dtype=np.float32), np.float32(2), shift=0), [0, 2])
    assert len(traces) == 2 and files(store) == []


def decode_like(inputs: DecodeInputs) -> DecodeOutput:
    return DecodeOutput(inputs.prompt + inputs.pad[:, None], inputs.temperature * inputs.audio.sum((1, 2)),
                        jnp.zeros(inputs.pad.shape), None, (inputs.audio, inputs.audio * 2))


def test_the_decode_pytrees_cross_a_stored_program_and_are_read_ahead(store, monkeypatch):
    """DecodeInputs and DecodeOutput (a None field among them) survive the round trip through
    the file, and prefetch reads back the programs the previous run began with."""
    traces = []
    rng = np.random.default_rng(0)
    inputs = DecodeInputs(rng.standard_normal((2, 3, 4)).astype(np.float32), np.ones((2, 5), np.int32),
                          np.array([0, 2], np.int32), np.int32(1), np.zeros(7, bool), np.zeros(7, bool),
                          np.float32(0.5), np.zeros(2, np.uint32))
    made = stored(decode_like, traces)(inputs)
    (manifest,) = files(store, programs.FIRST)
    assert (store / manifest).read_text().split() == files(store)

    new_process(monkeypatch)
    programs.prefetch()
    assert list(programs._READ._pending) == files(store)
    waits = []

    def listener(event, seconds, **_):
        if event == programs.WAIT_EVENT:
            waits.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        read = stored(decode_like, traces)(inputs)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert traces == [1] and waits == [programs.WAIT_EVENT] and not programs._READ._pending
    assert isinstance(read, DecodeOutput) and read.looped is None
    for a, b in zip(jax.tree.leaves(made), jax.tree.leaves(read)):
        np.testing.assert_array_equal(a, b)


def test_each_model_has_its_own_list_of_programs_to_read_back(store, monkeypatch):
    """A run reads back the programs the last run of the same tag (the model) began with, not
    those of a run of another model in between."""
    traces = []
    inputs = DecodeInputs(np.zeros((2, 3, 4), np.float32), np.ones((2, 5), np.int32), np.zeros(2, np.int32),
                          np.int32(1), np.zeros(7, bool), np.zeros(7, bool), np.float32(0.5), np.zeros(2, np.uint32))
    new_process(monkeypatch)
    programs.prefetch("tiny.en")
    stored(decode_like, traces)(inputs)
    tiny = files(store)
    new_process(monkeypatch)
    programs.prefetch("base")
    assert not programs._READ._pending  # nothing was remembered for base
    stored(decode_like, traces)(inputs.replace(audio=np.zeros((2, 3, 5), np.float32)))  # another program
    assert len(files(store)) == 2 and len(files(store, programs.FIRST)) == 2
    new_process(monkeypatch)
    programs.prefetch("tiny.en")
    assert list(programs._READ._pending) == tiny  # base's run did not replace tiny.en's list


READ_BACK = """
import sys
import numpy as np
import jax, jax.numpy as jnp
from pathlib import Path
from whisperjax_cli import programs
programs.store_folder = lambda: Path(sys.argv[1])

def affine(x):
    return x * 2 + 1

def eigenvalues(x):
    return jnp.linalg.eigvalsh(x)

affine, eigenvalues = programs.StoredJit(affine, ()), programs.StoredJit(eigenvalues, ())
print(affine(np.arange(3, dtype=np.float32)).tolist(), "scipy.linalg" in sys.modules)
print(np.round(eigenvalues(np.diag(np.array([3, 1, 2], np.float32))), 4).tolist())
"""


def test_lapack_is_set_up_only_for_a_program_that_calls_it(tmp_path):
    """Reading back a program JAX set up LAPACK first (SciPy's BLAS, 0.15 s); now only for a
    program that calls a LAPACK routine, which still runs (a fresh process each time)."""
    import subprocess
    import sys

    runs = [subprocess.run([sys.executable, "-c", READ_BACK, str(tmp_path)], capture_output=True, text=True)
            for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[-1].stderr
    assert len(files(tmp_path)) == 2
    made, read = (r.stdout.splitlines() for r in runs)
    assert made[1] == read[1] == "[1.0, 2.0, 3.0]"
    assert read[0] == "[1.0, 3.0, 5.0] False"  # the first process traced (and imported SciPy) alike


def few_rows_product(x, w):
    return x @ w


@pytest.mark.parametrize("flags, expect_ynn", [({"avx2"}, False), ({"avx2", "avx512f"}, True)])
def test_decode_programs_compile_without_ynnpack_on_a_cpu_without_avx512(store, monkeypatch, flags, expect_ynn):
    # YNNPACK's few-row kernel ran a beam-5 or 8-row decode step of base 15-30 % slower than
    # XLA's own kernels on an AVX2-only CPU (AMD EPYC Zen 3); runtime.program_options turns
    # it off there for the decode programs alone, in every way a program is compiled.
    from whisperjax_cli import runtime

    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    assert runtime.program_options("beam_search_window", "cpu") == ({} if expect_ynn else {runtime.YNN_FUSIONS: ""})
    assert runtime.program_options("encode", "cpu") == {}
    # The policy names the decode programs by function name: a rename must not drop them silently.
    from whisperjax_cli import beam, decoding

    assert {decoding.decode_window.__name__, beam.beam_search_window.__name__} == runtime.MULTI_ROW_PROGRAMS
    assert runtime.program_options("decode_window", "gpu") == {}
    x, w = np.ones((5, 512), np.float32), np.ones((512, 1024), np.float32)

    def texts(name):
        fn = lambda x, w: few_rows_product(x, w)  # noqa: E731
        fn.__name__ = name
        made = programs.StoredJit(fn, ())
        np.testing.assert_array_equal(made(x, w), x @ w)  # made and stored
        new_process(monkeypatch)
        again = programs.StoredJit(fn, ())
        np.testing.assert_array_equal(again(x, w), x @ w)  # read back and compiled
        plain = made._jit.lower(x, w).compile()  # no folder: plain jax.jit
        return [p.as_text() for p in (*made._programs.values(), *again._programs.values(), plain)]

    for name, ynn in (("encode", True), ("decode_window", expect_ynn)):
        assert ["__ynn_fusion" in text for text in texts(name)] == [ynn] * 3, name
    # Inside another trace (shard_map over several devices, an enclosing jit) JAX takes no
    # compiler options: the program is traced into the caller's as before, with or without a folder.
    inner = lambda x, w: few_rows_product(x, w)  # noqa: E731
    inner.__name__ = "decode_window"
    for folder in (store, None):
        monkeypatch.setattr(programs, "store_folder", lambda folder=folder: folder)
        np.testing.assert_array_equal(jax.jit(programs.StoredJit(inner, ()))(x, w), x @ w)
