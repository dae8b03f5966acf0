"""What start-up shortcuts must keep equal: weight shapes without tracing, lazily split keys."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from whisperjax_cli.window_decoder import LazyKey
from whisperjax_cli.dims import OFFICIAL_DIMS, ModelDimensions
from whisperjax_cli.errors import ModelError
from whisperjax_cli.model import Whisper
from whisperjax_cli.weights import expected_shapes, flatten, name_table

# Audio and text widths differ here, so the cross-attention key/value shapes are checked too.
UNEVEN = ModelDimensions(8, 10, 16, 2, 1, 40, 12, 24, 3, 2)


@pytest.mark.parametrize("dims", [OFFICIAL_DIMS["tiny.en"], OFFICIAL_DIMS["large-v3"], UNEVEN],
                         ids=["tiny.en", "large-v3", "uneven"])
def test_expected_shapes_equal_the_traced_init(dims):
    """The shape table worked out from the dimensions is what Flax's init makes."""
    params = jax.eval_shape(
        lambda: Whisper(dims).init(jax.random.PRNGKey(0), jnp.zeros((1, 2 * dims.n_audio_ctx, dims.n_mels)),
                                   jnp.zeros((1, 1), jnp.int32))["params"]
    )
    flat = flatten(params)
    traced = {}
    for ours, theirs, kind in name_table(dims):
        shape = flat[ours].shape
        traced[theirs] = shape[::-1] if kind in ("linear", "conv") else shape
    assert expected_shapes(dims) == traced


def test_lazy_key_draws_the_keys_of_eager_splits():
    root = jax.random.PRNGKey(7)
    eager, lazy = root, LazyKey(root)
    eager_subs, lazy_subs = [], []
    for _ in range(4):
        eager, sub = jax.random.split(eager)
        lazy, lazy_sub = lazy.split()
        eager_subs.append(sub)
        lazy_subs.append(lazy_sub)
    # Drawn out of order, and the chain's end last: each is the eager key all the same.
    for i in (2, 0, 3, 1):
        np.testing.assert_array_equal(lazy_subs[i].value(), eager_subs[i])
    np.testing.assert_array_equal(lazy.value(), eager)
    np.testing.assert_array_equal(LazyKey().split()[1].value(), jax.random.split(jax.random.PRNGKey(0))[1])


def test_download_with_hf_hub_offline_names_the_setting(monkeypatch, tmp_path):
    from whisperjax_cli.models import hub_snapshot

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError) as err:
        hub_snapshot("nobody-wjx-test/absent", download=True)
    assert "HF_HUB_OFFLINE is set" in str(err.value) and "network" not in str(err.value)


_CACHED_JIT_SCRIPT = """
import sys
from pathlib import Path
import jax, jax.numpy as jnp, numpy as np
from whisperjax_cli import runtime

runtime.enable_compile_cache(Path(sys.argv[1]))
runtime.prefetch_programs("test")  # what the last process of this group ran first, in the background
traced, served = [], []
take = runtime._take_prefetched

def take_and_count(name):
    got = take(name)
    served.append(got is not None)
    return got

runtime._take_prefetched = take_and_count

@runtime.cached_jit(static_argnames=("scale",))
def f(x, y, scale):
    traced.append(1)
    return jnp.tanh(x @ x.T) * scale + jnp.broadcast_to(y, (x.shape[0], x.shape[0]))

x = np.linspace(-1, 1, 64 * 32, dtype=np.float32).reshape(64, 32)
out = np.asarray(f(x, np.float32(0.5), scale=3.0))
print(len(traced), sum(served), float(out.sum()), float(np.tanh(x @ x.T).sum() * 3.0 + 0.5 * 64 * 64))
"""


def test_cached_jit_loads_whole_programs_in_a_new_process(tmp_path):
    """A second process runs the kept program without tracing (loaded ahead, in the background);
    a program that came from JAX's cache is compiled again before it is kept (XLA:CPU's copy of
    it would fail to run)."""
    import subprocess
    import sys

    cache = tmp_path / "jax"

    def run() -> tuple[int, int, float]:
        proc = subprocess.run([sys.executable, "-c", _CACHED_JIT_SCRIPT, str(cache)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        traces, served, got, want = proc.stdout.split()
        assert abs(float(got) - float(want)) < 1e-2 * abs(float(want))
        return int(traces), int(served), float(got)

    traces, served, first = run()
    assert (traces, served) == (1, 0)
    kept = sorted(p.name for p in cache.glob("wjx-aot-f-*"))
    assert len(kept) == 1 and any(p.name.startswith("jit_f-") for p in cache.iterdir())
    assert run() == (0, 1, first)
    for p in cache.glob("wjx-aot-f-*"):
        p.unlink()  # JAX's entry stays: the next process gets the program from JAX's cache
    traces, served, again = run()
    assert traces >= 1 and served == 0 and again == first  # traced, and compiled once more past JAX's cache
    assert sorted(p.name for p in cache.glob("wjx-aot-f-*")) == kept
    assert run() == (0, 1, first)


def test_preloaded_weights_are_those_load_model_reads(tiny_en):
    """preload_model lays the weights out on a background thread (before JAX starts, in the CLI);
    load_model takes them when the path and dtype agree, and reads the files itself otherwise."""
    from whisperjax_cli import models, weights

    assert models.preload_model("tiny.en", None, "cpu")
    model = models.load_model("tiny.en", dtype="float32")
    assert not models._preloading  # taken
    want, got = jax.tree_util.tree_leaves(tiny_en.params), jax.tree_util.tree_leaves(model.params)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    assert models.preload_model("tiny.en", "mixed", None)
    mixed = models.load_model("tiny.en", dtype="mixed")
    assert not models._preloading and mixed.dtype == jnp.float32 and mixed.matmul_dtype == jnp.bfloat16
    flat_mixed, flat_ref = weights.flatten(mixed.params), weights.flatten(tiny_en.params)
    assert sorted(flat_mixed) == sorted(flat_ref)
    for name, ref in flat_ref.items():
        got = flat_mixed[name]
        if weights.is_mixed_weight(tuple(name.split("/"))):
            assert got.dtype == jnp.bfloat16, name
            np.testing.assert_array_equal(np.asarray(got), np.asarray(ref).astype(jnp.bfloat16))
        else:
            assert got.dtype == jnp.float32, name
            np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    # The products mixed_matmul covers: every kernel of the encoder's blocks, and the embedding.
    assert sum(weights.is_mixed_weight(tuple(n.split("/"))) for n in flat_ref) == 6 * tiny_en.dims.n_audio_layer + 1

    assert models.preload_model("tiny.en", "float16", None)
    again = models.load_model("tiny.en", dtype="float32")  # another dtype: read again
    assert not models._preloading
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(again.params))

    assert not models.preload_model("no/such-model-here", None, "cpu")  # a Hub id: left to load_model
    assert not models._preloading


def test_guess_dtype_without_jax(monkeypatch):
    from whisperjax_cli.models import _guess_dtype

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert _guess_dtype(None, "cpu") == np.float32
    assert _guess_dtype(None, "gpu") == jnp.bfloat16
    assert _guess_dtype("bfloat16", None) == jnp.bfloat16
    assert _guess_dtype(jnp.float16, None) == np.float16
    assert _guess_dtype("int8", None) is None
    assert _guess_dtype("mixed", None) == "mixed"
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert _guess_dtype(None, None) is None  # not known before JAX starts
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert _guess_dtype(None, None) == np.float32


_SPECULATE_SCRIPT = """
import hashlib, sys
from pathlib import Path
import jax, jax.numpy as jnp, numpy as np
from whisperjax_cli import runtime

runtime.enable_compile_cache(Path(sys.argv[1]))
runtime.prefetch_programs("test")
taken = []
take = runtime._take_speculated

def take_and_count(name, dynamic):
    got = take(name, dynamic)
    taken.append(got is not None)
    return got

runtime._take_speculated = take_and_count

@runtime.cached_jit(static_argnames=("scale",))
def f(x, y, scale):
    return jnp.tanh(x @ x.T) * scale + y

x = np.linspace(-1, 1, 64 * 32, dtype=np.float32).reshape(64, 32)
ahead = {"same": x.copy(), "other": x + 1, "none": None}[sys.argv[2]]
started = ahead is not None and runtime.speculate("f", [ahead, np.float32(0.5)])
out = np.asarray(f(x, np.float32(0.5), scale=3.0))
print(int(started), sum(taken), hashlib.sha256(out.tobytes()).hexdigest())
"""


def test_speculated_first_call_is_used_only_for_equal_arguments(tmp_path):
    """runtime.speculate runs the program the last process used first, on a background thread;
    the call gets that result only when its arguments are equal, and it is the same bits."""
    import subprocess
    import sys

    cache = tmp_path / "jax"

    def run(ahead: str) -> tuple[int, int, str]:
        proc = subprocess.run([sys.executable, "-c", _SPECULATE_SCRIPT, str(cache), ahead],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        started, taken, digest = proc.stdout.split()
        return int(started), int(taken), digest

    started, taken, want = run("same")
    assert (started, taken) == (0, 0)  # nothing kept yet: nothing to run ahead
    assert run("none") == (0, 0, want)
    assert run("same") == (1, 1, want)
    assert run("other") == (1, 0, want)  # run ahead on other values: not used, computed as usual


def test_read_ahead_audio_and_its_errors(tmp_path):
    """The CLI decodes a lone input ahead; the transcription gets that audio, and a failure
    is raised again when the transcription reads the file, as without the read-ahead."""
    from whisperjax_cli.audio import load_audio
    from whisperjax_cli.cli import _read_ahead
    from whisperjax_cli.cli_files import Input
    from whisperjax_cli.errors import AudioError

    clip = Path(__file__).parent / "data" / "numbers.flac"
    options = {"mode": "sequential", "language": None}
    one = [Input(str(clip), clip)]
    assert callable(_read_ahead(one, options))
    np.testing.assert_array_equal(one[0].loader()(), load_audio(str(clip)))
    assert _read_ahead([Input(str(clip), clip), Input(str(clip), clip)], options) is None
    assert _read_ahead([Input("-", None)], options) is None
    assert _read_ahead(one, {**options, "mode": "batched"}) is None

    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    broken = [Input(str(bad), bad)]
    assert callable(_read_ahead(broken, options))
    with pytest.raises(AudioError) as ahead:
        broken[0].loader()()
    with pytest.raises(AudioError) as plain:
        load_audio(str(bad))
    assert str(ahead.value) == str(plain.value)


_CLEAR_SCRIPT = """
import sys, jax, jax.numpy as jnp
from whisperjax_cli import runtime
runtime.enable_compile_cache(__import__('pathlib').Path(sys.argv[1]))
maps = lambda: sum(1 for _ in open('/proc/self/maps'))
fns = [runtime.cached_jit()(lambda x, k=k: jnp.sin(x) * k + jnp.cumsum(x)) for k in range(20)]
before = maps()
for f in fns:
    f(jnp.ones(1000)).block_until_ready()
held = maps()
runtime.clear_programs()
import gc; gc.collect()
print(before, held, maps(), sum(len(f._compiled) for f in fns))
"""


def test_clear_programs_unmaps_compiled_code(tmp_path):
    """A process compiling for many models and modes in turn (bench/longform.py) ran out of
    memory mappings (vm.max_map_count) with every program held; clear_programs lets them go."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _CLEAR_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout.split()
    before, held, after, kept = map(int, out[-4:])
    assert held - before >= 20  # code mapped for each program
    assert after - before < (held - before) / 2 and kept == 0
