"""The decoder's key/value cache: its layout, and the gathers that move rows and slots.

A :class:`KVCache` is data that goes in and out of ``Whisper.decode`` (see :mod:`whisperjax_cli.model`):
self-attention buffers preallocated for a window's prompt and sampled tokens, and the audio's
cross-attention keys/values computed once per window. Beams and shrinking batches rearrange it
with :func:`take_rows`, :func:`take_slots` and :func:`repeat_rows`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from whisperjax_cli.decode_types import pytree_dataclass
from whisperjax_cli.dims import ModelDimensions

Array = jax.Array


@pytree_dataclass
class KVCache:
    """Per-layer key/value buffers for the decoder, head-major.

    ``cross_k`` is ``[batch, heads, head_dim, n_audio_ctx]`` and ``cross_v`` ``[batch, heads,
    n_audio_ctx, head_dim]``, written once per audio window: keys transposed, so that a decode
    step's one query per head multiplies them as a row times a matrix read in order (a batch-8
    step of tiny.en took 30 ms instead of 39 with keys ``[..., n_audio_ctx, head_dim]``).
    ``self_k``/``self_v`` are ``[batch * heads, length, head_dim]`` (row ``r``'s heads at
    ``r * heads ...``), ``length`` the static decode buffer, written at the current index.
    Head-major storage lets each step's attention read the buffers in place (a ``[batch,
    length, state]`` layout made XLA transpose every layer's audio keys and values at every
    token); folding batch and heads into one axis lets the attention read the
    buffer the step just wrote without a reshape, and XLA then writes it in place (with
    ``[batch, heads, ...]`` it copied every layer's buffers several times per token at batch 1).
    Use :func:`take_rows` to gather rows.
    """

    self_k: tuple[Array, ...]
    self_v: tuple[Array, ...]
    cross_k: tuple[Array, ...]
    cross_v: tuple[Array, ...]

    @property
    def length(self) -> int:
        return self.self_k[0].shape[1]


def init_cache(dims: ModelDimensions, cross_kv: tuple, length: int, dtype=jnp.float32) -> KVCache:
    """Makes an empty self-attention cache, one row per audio, next to precomputed cross-attention
    keys/values (:func:`repeat_rows` then gives several rows per audio: beams or samples).

    Args:
      dims: model dimensions.
      cross_kv: ``(keys, values)`` tuples per layer from :meth:`Whisper.cross_kv`.
      length: static length of the self-attention buffers (prompt + tokens to sample).
      dtype: buffer dtype (the compute dtype).
    """
    keys, values = cross_kv
    batch = keys[0].shape[0]
    shape = (batch * dims.n_text_head, length, dims.n_text_state // dims.n_text_head)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(dims.n_text_layer))
    return KVCache(self_k=zeros, self_v=zeros, cross_k=tuple(keys), cross_v=tuple(values))


def heads_view(x: Array) -> Array:
    """``[rows, heads, ...]`` -> ``[rows * heads, ...]`` (the self-attention buffers' layout)."""
    return x.reshape(-1, *x.shape[2:])


def rows_view(x: Array, heads: int) -> Array:
    """``[rows * heads, ...]`` -> ``[rows, heads, ...]``, for gathering rows."""
    return x.reshape(-1, heads, *x.shape[1:])


def take_rows(cache: KVCache, rows: Array, audio_rows: Optional[Array] = None) -> KVCache:
    """The cache of decoder rows ``rows`` (self-attention) and audios ``audio_rows`` (cross;
    unchanged when None)."""
    heads = cache.cross_k[0].shape[1]
    pick = lambda x: heads_view(rows_view(x, heads)[rows])  # noqa: E731
    cache = cache.replace(self_k=tuple(map(pick, cache.self_k)), self_v=tuple(map(pick, cache.self_v)))
    if audio_rows is not None:
        cache = cache.replace(cross_k=tuple(x[audio_rows] for x in cache.cross_k),
                              cross_v=tuple(x[audio_rows] for x in cache.cross_v))
    return cache


def take_slots(cache: KVCache, rows: Array, start: Array, stop: Array, block: int) -> KVCache:
    """:func:`take_rows` of the self-attention slots ``[start, stop)`` only; the other slots keep
    each row's own. For beams, whose buffers differ only after the prompt they share: a step
    then copies the few slots sampled so far instead of every buffer whole (with whole
    buffers gathered, a beam-5 step of tiny.en with a 232-token prompt took 35 ms, not 24).
    Copies whole blocks of ``block`` slots, the buffers' length a multiple of it, in place.
    """
    heads = cache.cross_k[0].shape[1]
    if cache.length % block:
        raise ValueError(f"buffer length {cache.length} is not a multiple of {block}")

    def copy_block(i, buffers):
        def one(x):
            piece = jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=1)
            # one slice per row (a copy in place); a gather ran ~2x slower
            moved = [jax.lax.dynamic_slice_in_dim(piece, r * heads, heads, axis=0) for r in rows]
            return jax.lax.dynamic_update_slice_in_dim(x, jnp.concatenate(moved, axis=0), i * block, axis=1)

        return jax.tree_util.tree_map(one, buffers)

    self_k, self_v = jax.lax.fori_loop(start // block, -(-stop // block), copy_block, (cache.self_k, cache.self_v))
    return cache.replace(self_k=self_k, self_v=self_v)


def repeat_rows(cache: KVCache, times: int) -> KVCache:
    """Each decoder row's self-attention cache ``times`` times in a row (a prompt run once for a
    group of samples); the audio keys/values stay one per audio."""
    heads = cache.cross_k[0].shape[1]
    rep = lambda x: heads_view(jnp.repeat(rows_view(x, heads), times, axis=0))  # noqa: E731
    return cache.replace(self_k=tuple(map(rep, cache.self_k)), self_v=tuple(map(rep, cache.self_v)))
