"""Whisper in Flax Linen, with an explicit KV cache.

The cache is data that goes in and comes out: ``decode(tokens, cache, index) -> (logits, cache)``.
Self-attention keys/values live in preallocated buffers updated with ``dynamic_update_slice``;
cross-attention keys/values are computed once per audio window by :meth:`Whisper.cross_kv`.
The cache itself, and the gathers that rearrange it, are in :mod:`whisperjax_cli.kv_cache`.
This module is a leaf: it imports nothing from decoding, audio or the CLI.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from whisperjax_cli.dims import ModelDimensions
from whisperjax_cli.kv_cache import KVCache, heads_view, init_cache, rows_view

Array = jax.Array
_NEG_INF = -1e9  # added to masked attention scores; finite so fully-masked rows stay NaN-free


def mixed_matmul(lhs: Array, rhs: Array, dimension_numbers, matmul_dtype) -> Array:
    """``dot_general`` with both operands in ``matmul_dtype`` and float32 accumulation and result.

    On a CPU with bfloat16 dot instructions (AVX512-BF16: Zen 4, Sapphire Rapids) XLA runs a
    bfloat16 GEMM about twice as fast as a float32 one, except a single-row product (a
    matrix-vector one), which it runs ~10x slower: callers keep those in float32.
    """
    return jax.lax.dot_general(lhs.astype(matmul_dtype), rhs.astype(matmul_dtype), dimension_numbers,
                               preferred_element_type=jnp.float32)


STREAM_STEP = 8  # rows of the weights a step of few_rows_product reads (divides every official width)


def few_rows_product(x: Array, w: Array, step: int = STREAM_STEP) -> Array:
    """``x @ w`` for ``x`` of a few rows ``[..., rows, k]`` and ``w`` ``[..., k, n]`` (leading axes
    batched), float32, as a running sum over ``step`` rows of ``w`` at a time: the weights stream
    through once, as in a matrix-vector product.

    For the vocabulary projection of a decode step of 2-8 rows (5 beams, 8 windows), XLA's own
    CPU kernels (jax 0.10.2, without YNNPACK) took ~4x the time of one row: base (106 MB of
    weights), median of 9 on an AMD EPYC Zen 3: 5 rows 25.6 ms, 8 rows 20.2, one row 5.7; this
    loop 14.5 and 14.6. From 12 rows on XLA's product is faster (22 against 24 ms), and for the
    layers' smaller weights (1-4 MB) it is at every row count.

    And for a beam group's cross-attention scores, its 5 queries per head against the audio keys
    ``[..., head_dim, n_audio_ctx]``: XLA's batched product read the keys at 2-4 GB/s. tiny.en's
    4 layers, caches flushed, median of 25, AMD EPYC Zen 3: one audio 3.60 ms against 2.06 with
    this loop, 4 audios 14.8 against 5.6, 8 audios 21.9 against 8.0; one query per audio 1.06
    against 1.22 (so not used for it); the values' product was not faster so.
    """
    k = x.shape[-1]
    whole = k - k % step

    def body(i, acc):
        part = jax.lax.dynamic_slice_in_dim(w, i * step, step, w.ndim - 2).astype(jnp.float32)  # [..., step, n]
        xs = jax.lax.dynamic_slice_in_dim(x, i * step, step, x.ndim - 1).astype(jnp.float32)  # [..., rows, step]
        return acc + jnp.sum(xs[..., None] * part[..., None, :, :], axis=-2)

    acc = jax.lax.fori_loop(0, whole // step, body, jnp.zeros((*x.shape[:-1], w.shape[-1]), jnp.float32))
    if whole < k:  # a width that is not a multiple of step (no official model's)
        acc = acc + x[..., whole:].astype(jnp.float32) @ w[..., whole:, :].astype(jnp.float32)
    return acc


def _keep_kernel(inputs, kernel, bias, dtype=None):
    """Dense's promote_dtype for a kernel stored in the matmul dtype: only the input and bias move."""
    return inputs.astype(dtype), kernel, None if bias is None else bias.astype(dtype)


class GivenParams:
    """Reads parameters that are given (``apply``) without Flax's check of each against its
    initializer: ``Module.param`` runs ``jax.eval_shape`` of the initializer for every weight at
    every trace, ~0.2 s of the ~0.45 s a new process spent tracing ``decode_window`` for tiny.en.
    The shape is still checked where the initializer's shape is given. ``init`` is unchanged."""

    def param(self, name, init_fn, *init_args, unbox: bool = True, **init_kwargs):
        if not self.has_variable("params", name):
            return super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)
        value = self.get_variable("params", name)
        shape = init_args[0] if init_args and isinstance(init_args[0], tuple) else None
        if shape is not None and tuple(np.shape(value)) != tuple(shape):
            raise flax.errors.ScopeParamShapeError(name, self.scope.path_text, np.shape(value), tuple(shape))
        return value


class Dense(GivenParams, nn.Dense):
    pass


class LayerNorm(GivenParams, nn.LayerNorm):
    pass


class Conv(GivenParams, nn.Conv):
    pass


MIXED_MIN_ROWS = 64  # a decoder product of fewer rows (a decode step) stays float32, see dense
VOCAB_BLOCK = 2048  # vocabulary columns per block of TextDecoder.target_probs
MIXED_MIN_QUERIES = 8  # and so do its attention products with fewer queries per head
STREAM_QUERIES = 16  # up to this many queries per head (a beam group's) use few_rows_product


def dense(features: int, dtype, matmul_dtype=None, use_bias: bool = True, min_rows: int = 0) -> Dense:
    """``nn.Dense``; with ``matmul_dtype``, it multiplies in that dtype (float32 accumulation).

    The kernel keeps the dtype it was stored in: the encoder's are stored in ``matmul_dtype``
    at load. The decoder's stay float32, for decode steps, and with ``min_rows`` a product of
    fewer rows runs in float32: a step of 8 rows ran no faster in bfloat16 and a single row
    ~10x slower, while the prompt (8 x 232 rows) and the audio keys/values (8 x 1500) run
    about twice as fast in bfloat16, the kernel cast inside the program.
    """
    if matmul_dtype is None:
        return Dense(features, use_bias=use_bias, dtype=dtype)

    def dot(lhs, rhs, dims, precision=None, preferred_element_type=None):
        if math.prod(lhs.shape[:-1]) < min_rows:  # rows: every axis but the contracted last
            return jax.lax.dot_general(lhs, rhs.astype(dtype), dims)
        return mixed_matmul(lhs, rhs, dims, matmul_dtype).astype(dtype)

    return Dense(features, use_bias=use_bias, dtype=dtype, promote_dtype=_keep_kernel, dot_general=dot)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Array:
    """OpenAI's sinusoidal position embedding for the audio encoder, ``[length, channels]``."""
    log_timescale_increment = jnp.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = jnp.exp(-log_timescale_increment * jnp.arange(channels // 2))
    scaled_time = jnp.arange(length)[:, None] * inv_timescales[None, :]
    return jnp.concatenate([jnp.sin(scaled_time), jnp.cos(scaled_time)], axis=1)


def split_heads(x: Array, n_head: int) -> Array:
    """``[batch, len, state]`` -> ``[batch, heads, len, head_dim]``."""
    b, t, d = x.shape
    return x.reshape(b, t, n_head, d // n_head).transpose(0, 2, 1, 3)


def merge_heads(x: Array) -> Array:
    """``[batch, heads, len, head_dim]`` -> ``[batch, len, state]``."""
    b, h, t, dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * dh)


def _query_blocks(q_len: int, target: int = 300) -> int:
    """How many equal query blocks to attend in turn (1: all at once)."""
    if q_len < 2 * target:
        return 1
    for n in range(-(-q_len // target), q_len // 64 + 1):
        if q_len % n == 0:
            return n
    return 1


def _product(equation: str, a: Array, b: Array, matmul_dtype=None) -> Array:
    """``einsum``; with ``matmul_dtype``, its operands in it and float32 accumulation (mixed_matmul)."""
    if matmul_dtype is None:
        return jnp.einsum(equation, a, b)
    return jnp.einsum(equation, a.astype(matmul_dtype), b.astype(matmul_dtype), preferred_element_type=jnp.float32)


def _attend(q: Array, k: Array, v: Array, mask: Optional[Array], matmul_dtype=None,
            keys_transposed: bool = False) -> Array:
    """Softmax attention over ``[..., len, head_dim]`` operands (keys ``[..., head_dim, len]``
    when ``keys_transposed``); ``mask`` (True = attend) broadcasts against the scores
    ``[..., q_len, kv_len]``. With ``matmul_dtype`` both products take their operands in it
    (float32 accumulation), the softmax stays in float32."""
    equation = "...td,...ds->...ts" if keys_transposed else "...td,...sd->...ts"
    scores = _product(equation, q, k, matmul_dtype).astype(jnp.float32) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = jnp.where(mask, scores, _NEG_INF)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return _product("...ts,...sd->...td", weights, v, matmul_dtype).astype(v.dtype)


def attention(q: Array, k: Array, v: Array, mask: Optional[Array], matmul_dtype=None,
              keys_transposed: bool = False) -> Array:
    """Scaled dot-product attention, head-major.

    Long unmasked queries (the encoder's 1500 positions) are attended in blocks of ~300 one
    after another, so each block's scores stay in cache: 1.5-2x faster on CPU than one
    ``[heads, 1500, 1500]`` score tensor, and the result is the same.

    Args:
      q: ``[batch, heads, q_len, head_dim]``; k, v: ``[batch, heads, kv_len, head_dim]``.
      mask: boolean ``[batch, q_len, kv_len]`` (True = attend) or None.
      keys_transposed: ``k`` is ``[batch, heads, head_dim, kv_len]``.
    Returns:
      ``[batch, q_len, state]``.
    """
    b, h, t, dh = q.shape
    n = _query_blocks(t) if mask is None else 1
    if n == 1:
        return merge_heads(_attend(q, k, v, None if mask is None else mask[:, None], matmul_dtype, keys_transposed))
    blocks = q.reshape(b, h, n, t // n, dh).transpose(2, 0, 1, 3, 4)  # [blocks, batch, heads, t/n, head_dim]
    out = jax.lax.map(lambda qb: _attend(qb, k, v, None, matmul_dtype, keys_transposed), blocks)
    return merge_heads(out.transpose(1, 2, 0, 3, 4).reshape(b, h, t, dh))


class MultiHeadAttention(nn.Module):
    n_state: int
    n_head: int
    dtype: Any = jnp.float32
    matmul_dtype: Any = None  # see mixed_matmul and dense
    min_rows: int = 0  # products of fewer rows stay float32 (the decoder's: MIXED_MIN_ROWS)
    stream_queries: bool = False  # a group's cross-attention scores as few_rows_product

    def setup(self):
        proj = lambda bias=True: dense(self.n_state, self.dtype, self.matmul_dtype, bias, self.min_rows)  # noqa: E731
        self.query, self.key, self.value, self.out = proj(), proj(False), proj(), proj()

    def _product_dtype(self, q: Array):
        """The attention products' matmul dtype for queries ``q`` ``[..., q_len, head_dim]``: with
        ``min_rows``, a decode step's one query per head (or a beam group's few) stays float32."""
        return None if self.min_rows and q.shape[-2] < MIXED_MIN_QUERIES else self.matmul_dtype

    def project_kv(self, x: Array) -> tuple[Array, Array]:
        """Keys and values of ``x`` ``[batch, len, state]``, head-major (what the cache stores)."""
        return split_heads(self.key(x), self.n_head), split_heads(self.value(x), self.n_head)

    def project_cross_kv(self, x: Array) -> tuple[Array, Array]:
        """:meth:`project_kv` with the keys transposed, ``[batch, heads, head_dim, len]`` (the
        cache's audio keys, see :class:`KVCache`)."""
        k, v = self.project_kv(x)
        return k.transpose(0, 1, 3, 2), v

    def _query(self, x: Array) -> Array:
        return split_heads(self.query(x), self.n_head)

    def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
        """Unmasked or masked self-attention without a cache (the encoder)."""
        k, v = self.project_kv(x)
        return self.out(attention(self._query(x), k, v, mask, self.matmul_dtype))

    def cached(self, x: Array, k_buf: Array, v_buf: Array, index: Array, mask: Array):
        """Self-attention that writes this step's keys/values into the buffers at ``index``.

        Returns ``(out, k_buf, v_buf)`` with the updated buffers.
        """
        k, v = self.project_kv(x)  # [batch, heads, q_len, head_dim]
        h = self.n_head
        k_buf = jax.lax.dynamic_update_slice(k_buf, heads_view(k).astype(k_buf.dtype), (0, index, 0))
        v_buf = jax.lax.dynamic_update_slice(v_buf, heads_view(v).astype(v_buf.dtype), (0, index, 0))
        # [batch * heads, q_len, head_dim]; the mask is per row, so repeated for its heads
        q = heads_view(self._query(x))
        out = _attend(q, k_buf, v_buf, jnp.repeat(mask, h, axis=0), self._product_dtype(q))
        return self.out(merge_heads(rows_view(out, h))), k_buf, v_buf

    def cross(self, x: Array, k: Array, v: Array) -> Array:
        """Attention to precomputed audio keys/values (never recomputed per token).

        ``x`` may hold several rows per audio (beams, or best-of samples): ``[audio * group,
        q_len, state]`` against ``k`` ``[audio, heads, head_dim, n_audio_ctx]`` and ``v``
        ``[audio, heads, n_audio_ctx, head_dim]`` (:meth:`project_cross_kv`). The
        group's queries are stacked as extra query positions, so each audio's keys and values
        are read once per step instead of once per row.
        """
        q = self._query(x)  # [rows, heads, q_len, head_dim]
        rows, h, t, dh = q.shape
        group = rows // k.shape[0]
        if group == 1:
            return self.out(attention(q, k, v, None, self._product_dtype(q), keys_transposed=True))
        q = q.reshape(k.shape[0], group, h, t, dh).transpose(0, 2, 1, 3, 4).reshape(k.shape[0], h, group * t, dh)
        dtype = self._product_dtype(q)
        if self.stream_queries and dtype is None and group * t <= STREAM_QUERIES:
            weights = jax.nn.softmax(few_rows_product(q, k) * dh ** -0.5, axis=-1).astype(v.dtype)
            out = merge_heads(_product("...ts,...sd->...td", weights, v).astype(v.dtype))
        else:
            out = attention(q, k, v, None, dtype, keys_transposed=True)  # [audio, group * q_len, state]
        return self.out(out.reshape(k.shape[0], group * t, -1).reshape(rows, t, -1))

    def cross_with_scores(self, x: Array, k: Array, v: Array) -> tuple[Array, Array]:
        """:meth:`cross` for one row per audio that also returns the attention scores, for word timing.

        Returns:
          ``(out [batch, q_len, state], scores float32 [batch, heads, q_len, n_audio_ctx])``: the
          scores scaled by ``1/sqrt(head_dim)``, before the softmax (OpenAI's ``qk``).
        """
        q = self._query(x)  # [batch, heads, q_len, head_dim]
        dtype = self._product_dtype(q)
        scores = _product("...td,...ds->...ts", q, k, dtype).astype(jnp.float32) * q.shape[-1] ** -0.5
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = _product("...ts,...sd->...td", weights, v, dtype).astype(v.dtype)
        return self.out(merge_heads(out)), scores


class ResidualAttentionBlock(nn.Module):
    n_state: int
    n_head: int
    cross_attention: bool = False
    dtype: Any = jnp.float32
    matmul_dtype: Any = None
    min_rows: int = 0  # see MultiHeadAttention
    stream_queries: bool = False  # and this, for the cross-attention

    def setup(self):
        ln = lambda: LayerNorm(epsilon=1e-5, dtype=self.dtype)  # noqa: E731
        self.attn = MultiHeadAttention(self.n_state, self.n_head, self.dtype, self.matmul_dtype, self.min_rows)
        self.attn_ln = ln()
        if self.cross_attention:
            self.cross_attn = MultiHeadAttention(self.n_state, self.n_head, self.dtype, self.matmul_dtype,
                                                 self.min_rows, self.stream_queries)
            self.cross_attn_ln = ln()
        self.mlp1 = dense(4 * self.n_state, self.dtype, self.matmul_dtype, min_rows=self.min_rows)
        self.mlp2 = dense(self.n_state, self.dtype, self.matmul_dtype, min_rows=self.min_rows)
        self.mlp_ln = ln()

    def _mlp(self, x: Array) -> Array:
        return x + self.mlp2(nn.gelu(self.mlp1(self.mlp_ln(x)), approximate=False))

    def __call__(self, x: Array) -> Array:
        """Encoder block: full self-attention, no cache."""
        return self._mlp(x + self.attn(self.attn_ln(x)))

    def decode(self, x, k_buf, v_buf, cross_k, cross_v, index, mask):
        """Decoder block over the cache; returns ``(x, k_buf, v_buf)``."""
        h, k_buf, v_buf = self.attn.cached(self.attn_ln(x), k_buf, v_buf, index, mask)
        x = x + h
        x = x + self.cross_attn.cross(self.cross_attn_ln(x), cross_k, cross_v)
        return self._mlp(x), k_buf, v_buf

    def decode_with_scores(self, x: Array, mask: Array, cross_k: Array, cross_v: Array) -> tuple[Array, Array]:
        """Decoder block over whole sequences without a cache (a teacher-forced pass): causal
        self-attention under ``mask`` ``[batch, q_len, q_len]``; returns ``(x, cross scores)``."""
        x = x + self.attn(self.attn_ln(x), mask)
        h, scores = self.cross_attn.cross_with_scores(self.cross_attn_ln(x), cross_k, cross_v)
        return self._mlp(x + h), scores

    def project_cross_kv(self, audio: Array) -> tuple[Array, Array]:
        return self.cross_attn.project_cross_kv(audio)


class AudioEncoder(GivenParams, nn.Module):
    dims: ModelDimensions
    dtype: Any = jnp.float32
    matmul_dtype: Any = None  # every block's products (weights stored in it); see mixed_matmul

    def setup(self):
        d = self.dims
        self.conv1 = Conv(d.n_audio_state, (3,), padding=((1, 1),), dtype=self.dtype)
        self.conv2 = Conv(d.n_audio_state, (3,), strides=(2,), padding=((1, 1),), dtype=self.dtype)
        self.positional_embedding = self.param(
            "positional_embedding", lambda _: sinusoids(d.n_audio_ctx, d.n_audio_state)
        )
        self.blocks = [
            ResidualAttentionBlock(d.n_audio_state, d.n_audio_head, dtype=self.dtype, matmul_dtype=self.matmul_dtype)
            for _ in range(d.n_audio_layer)
        ]
        self.ln_post = LayerNorm(epsilon=1e-5, dtype=self.dtype)

    def __call__(self, mel: Array, all_hidden: bool = False):
        """Encodes ``mel`` ``[batch, 2 * n_audio_ctx, n_mels]`` to ``[batch, n_audio_ctx, state]``.

        With ``all_hidden``, also returns HF's ``hidden_states``: the input to every block and
        the final (layer-normed) output, ``n_audio_layer + 1`` arrays.
        """
        x = nn.gelu(self.conv1(mel.astype(self.dtype)), approximate=False)
        x = nn.gelu(self.conv2(x), approximate=False)  # [batch, n_audio_ctx, state]
        x = x + self.positional_embedding.astype(x.dtype)
        hidden = []
        for block in self.blocks:
            hidden.append(x)
            x = block(x)
        x = self.ln_post(x)
        return (x, tuple(hidden) + (x,)) if all_hidden else x


class TextDecoder(GivenParams, nn.Module):
    dims: ModelDimensions
    dtype: Any = jnp.float32
    # the output projection's (token_embedding stored in it), and the blocks' for products of
    # at least MIXED_MIN_ROWS rows (the prompt, the audio keys/values; kernels stay float32)
    matmul_dtype: Any = None
    # products of 2 to stream_rows rows onto the vocabulary run as few_rows_product (0: none),
    # and so do a beam group's cross-attention scores (where not 0)
    stream_rows: int = 0

    def setup(self):
        d = self.dims
        # [state, vocab]: stored transposed so that the tied output projection, the costliest
        # matmul of a decode step, reads it in order; a lookup gathers a few columns.
        self.token_embedding = self.param(
            "token_embedding", nn.initializers.normal(0.02), (d.n_text_state, d.n_vocab)
        )
        self.positional_embedding = self.param(
            "positional_embedding", nn.initializers.normal(0.01), (d.n_text_ctx, d.n_text_state)
        )
        self.blocks = [
            ResidualAttentionBlock(d.n_text_state, d.n_text_head, cross_attention=True, dtype=self.dtype,
                                   matmul_dtype=self.matmul_dtype, min_rows=MIXED_MIN_ROWS,
                                   stream_queries=self.stream_rows > 0)
            for _ in range(d.n_text_layer)
        ]
        self.ln = LayerNorm(epsilon=1e-5, dtype=self.dtype)

    def cross_kv(self, audio: Array) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
        """Cross-attention keys and values of every layer, computed once per window."""
        kv = [block.project_cross_kv(audio.astype(self.dtype)) for block in self.blocks]
        return tuple(k for k, _ in kv), tuple(v for _, v in kv)

    def __call__(
        self, tokens: Array, cache: KVCache, index: Array, pad: Optional[Array] = None,
        logits_at: Optional[Array] = None,
    ):
        """Runs ``tokens`` ``[batch, q_len]`` written at cache slots ``[index, index + q_len)``.

        Args:
          tokens: int32 ``[batch, q_len]``.
          cache: the :class:`KVCache`.
          index: int32 scalar, the slot of the first token.
          pad: int32 ``[batch]``, number of left-padding slots per row (ignored keys, and
            positions counted from the first real slot), or None for no padding.
          logits_at: int32 ``[k]`` query positions to project onto the vocabulary, or None for
            all (a prompt's prefill needs two of its ~200 positions).
        Returns:
          ``(logits float32 [batch, q_len or k, n_vocab], new cache)``.
        """
        batch, q_len = tokens.shape
        pad = jnp.zeros((batch,), jnp.int32) if pad is None else pad
        query_slots = index + jnp.arange(q_len)  # [q_len]
        positions = jnp.clip(query_slots[None, :] - pad[:, None], 0, self.dims.n_text_ctx - 1)
        embedding = self.token_embedding
        if self.matmul_dtype is None:
            embedding = embedding.astype(self.dtype)
        x = jnp.take(embedding, tokens, axis=1).transpose(1, 2, 0).astype(self.dtype)  # [batch, q_len, state]
        x = x + self.positional_embedding[positions].astype(self.dtype)
        slots = jnp.arange(cache.length)  # [length]
        # [batch, q_len, length]: causal over the buffer, and never a left-padding slot.
        mask = (slots[None, None, :] <= query_slots[None, :, None]) & (slots[None, None, :] >= pad[:, None, None])
        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block.decode(
                x, cache.self_k[i], cache.self_v[i], cache.cross_k[i], cache.cross_v[i], index, mask
            )
            new_k.append(k)
            new_v.append(v)
        if logits_at is not None:
            x = jnp.take(x, logits_at, axis=1)  # [batch, k, state]
        x = self.ln(x)
        logits = self.project(x, embedding)  # tied output projection [batch, q_len, vocab]
        return logits, cache.replace(self_k=tuple(new_k), self_v=tuple(new_v))


    def _embedding(self) -> Array:
        """The tied embedding ``[state, vocab]`` in the dtype its products take (as ``__call__``)."""
        return self.token_embedding if self.matmul_dtype is not None else self.token_embedding.astype(self.dtype)

    def forward_with_scores(self, tokens: Array, cross_k: tuple, cross_v: tuple) -> tuple[Array, tuple]:
        """Teacher-forced pass over whole sequences from position 0, without a cache.

        One pass gives what word timing needs: every position's final hidden state and every
        layer's cross-attention scores. Padding after a row's last token is harmless: the
        self-attention is causal, so it changes nothing before it.

        Args:
          tokens: int32 ``[batch, q_len]``.
          cross_k, cross_v: per-layer audio keys/values (:meth:`cross_kv`).
        Returns:
          ``(hidden [batch, q_len, state] after the final layer norm, scores)``, ``scores`` a
          tuple per layer of float32 ``[batch, heads, q_len, n_audio_ctx]`` (pre-softmax).
        """
        q_len = tokens.shape[1]
        embedding = self._embedding()
        x = jnp.take(embedding, tokens, axis=1).transpose(1, 2, 0).astype(self.dtype)  # [batch, q_len, state]
        x = x + self.positional_embedding[:q_len].astype(self.dtype)
        causal = jnp.tril(jnp.ones((q_len, q_len), bool))[None]  # [1, q_len, q_len]
        mask = jnp.broadcast_to(causal, (tokens.shape[0], q_len, q_len))
        scores = []
        for i, block in enumerate(self.blocks):
            x, layer_scores = block.decode_with_scores(x, mask, cross_k[i], cross_v[i])
            scores.append(layer_scores)
        return self.ln(x), tuple(scores)

    def logits(self, x: Array) -> Array:
        """Float32 logits ``[batch, q, vocab]`` of final hidden states ``x`` ``[batch, q, state]``."""
        return self.project(x, self._embedding())

    def target_probs(self, x: Array, targets: Array, limit: int, block: int = VOCAB_BLOCK) -> Array:
        """Softmax probability of ``targets`` ``[rows]`` (ids below ``limit``) over the vocabulary's
        first ``limit`` entries, after final hidden states ``x`` ``[rows, state]``.

        The logits are made ``block`` columns at a time and folded into a running log-sum-exp,
        so they never leave the cache: 128 rows of tiny.en took 57 ms as whole logits and a
        log-softmax, 34 ms this way (AMD Zen 4, 2 cores). Each block is a slice of the embedding
        (a padded, reshaped copy would cost more than it saves).
        """
        embedding = self._embedding()
        block = min(block, limit)
        blocks = -(-limit // block)

        def fold(i, carry):
            high, total = carry
            start = jnp.minimum(i * block, limit - block)  # the last block overlaps the one before
            part = self.project(x[None], jax.lax.dynamic_slice_in_dim(embedding, start, block, axis=1))[0]
            fresh = (start + jnp.arange(block)) >= i * block  # columns no earlier block counted
            part = jnp.where(fresh[None, :], part, -jnp.inf)
            new_high = jnp.maximum(high, jnp.max(part, axis=-1))
            total = total * jnp.exp(high - new_high) + jnp.sum(jnp.exp(part - new_high[:, None]), axis=-1)
            return new_high, total

        rows = x.shape[0]
        high, total = jax.lax.fori_loop(0, blocks, fold, (jnp.full((rows,), -jnp.inf), jnp.zeros((rows,))))
        chosen = jnp.take(embedding, jnp.clip(targets, 0, limit - 1), axis=1).T  # [rows, state]
        picked = jnp.sum(x.astype(jnp.float32) * chosen.astype(jnp.float32), axis=-1)
        return jnp.exp(picked - high - jnp.log(total))

    def project(self, x: Array, embedding: Array) -> Array:
        """Logits ``[batch, q, vocab]`` of ``x`` ``[batch, q, state]`` (float32)."""
        batch, q, state = x.shape
        if self.matmul_dtype is None:
            if 2 <= batch * q <= self.stream_rows:
                return few_rows_product(x.reshape(batch * q, state), embedding).reshape(batch, q, -1)
            return (x @ embedding).astype(jnp.float32)
        rows = x.reshape(batch * q, state)
        if rows.shape[0] == 1:  # a matrix-vector product: padded, the slow bfloat16 path is avoided
            rows = jnp.pad(rows, ((0, 1), (0, 0)))
        logits = mixed_matmul(rows, embedding, (((1,), (0,)), ((), ())), self.matmul_dtype)
        return logits[: batch * q].reshape(batch, q, -1)


class Whisper(nn.Module):
    """The whole model. Call its methods through ``model.apply(..., method=...)``."""

    dims: ModelDimensions
    dtype: Any = jnp.float32
    matmul_dtype: Any = None  # see mixed_matmul; the weights is_mixed_weight names stored in it
    stream_rows: int = 0  # see TextDecoder.project and few_rows_product

    def setup(self):
        self.encoder = AudioEncoder(self.dims, self.dtype, self.matmul_dtype)
        self.decoder = TextDecoder(self.dims, self.dtype, self.matmul_dtype, self.stream_rows)

    def encode(self, mel: Array, all_hidden: bool = False):
        return self.encoder(mel, all_hidden)

    def cross_kv(self, audio: Array):
        return self.decoder.cross_kv(audio)

    def decode(self, tokens: Array, cache: KVCache, index: Array, pad: Optional[Array] = None,
               logits_at: Optional[Array] = None):
        return self.decoder(tokens, cache, index, pad, logits_at)

    def forward_with_scores(self, tokens: Array, cross_kv: tuple):
        """:meth:`TextDecoder.forward_with_scores` (word timing's one pass per window)."""
        return self.decoder.forward_with_scores(tokens, *cross_kv)

    def logits(self, x: Array) -> Array:
        """:meth:`TextDecoder.logits`: the output projection of final hidden states."""
        return self.decoder.logits(x)

    def target_probs(self, x: Array, targets: Array, limit: int) -> Array:
        """:meth:`TextDecoder.target_probs`: probabilities of given next tokens."""
        return self.decoder.target_probs(x, targets, limit)

    def __call__(self, mel: Array, tokens: Array):
        """Teacher-forced logits for ``tokens`` given ``mel`` (used for init and tests)."""
        audio = self.encode(mel)
        cache = init_cache(self.dims, self.cross_kv(audio), tokens.shape[1], self.dtype)
        logits, _ = self.decode(tokens, cache, jnp.int32(0))
        return logits
