"""What start-up shortcuts must keep equal: weight shapes without tracing, lazily split keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from whisperjax_cli.decoding import LazyKey
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
