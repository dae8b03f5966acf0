"""Which audio position each text token was spoken at: OpenAI's cross-attention alignment
(steps 1 and 2 of :mod:`whisperjax_cli.timing`'s recipe).

One jitted teacher-forced pass over ``sot sequence + <|notimestamps|> + text + <|endoftext|>``
(:func:`alignment_pass`), several windows at once, gives the alignment heads' cross-attention
scores and each text token's probability; the scores are cropped to each window's content,
normalised, median-filtered and averaged over the heads (:func:`attention_matrix`). Dynamic time
warping (:func:`dtw_trace`, a program of its own) and a host backtrace (:func:`backtrace`) give
the position where each token's row is entered. :func:`align_tokens` runs it all for the windows
of a decoded batch; turning the rows into words is :mod:`whisperjax_cli.timing`'s.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from whisperjax_cli.model import Whisper

TOKEN_BUCKETS = (32, 64, 96, 128, 192, 256, 448)  # padded sequence lengths: a run compiles a few programs


def median_filter(x: jax.Array, frames: jax.Array, width: int) -> jax.Array:
    """OpenAI's median filter along the last axis, reflecting at each row's last valid frame.

    Args:
      x: ``[batch, ..., F]``.
      frames: int32 ``[batch]``, valid positions per row (``[0, frames)``; the rest is ignored).
      width: odd filter width. A row with no more than ``width // 2`` frames is left as it is
        (``torch``'s reflect padding needs more, and OpenAI returns the input then).
    Returns:
      The filtered ``x``, same shape; positions past ``frames`` are unspecified.
    """
    return jax.vmap(lambda row, n: _median_row(row, n, width))(x, frames)


def _median_row(x: jax.Array, n: jax.Array, width: int) -> jax.Array:
    """:func:`median_filter` of one row ``x`` ``[..., F]`` with ``n`` valid frames.

    The reflected edges are written into a padded copy, so the taps are static slices and the
    sorting network runs as one fused loop (gathering the taps was 5x slower)."""
    half = width // 2
    f = x.shape[-1]
    left = x[..., 1 : half + 1][..., ::-1]  # x[half] .. x[1]
    right = jax.lax.dynamic_slice_in_dim(x, jnp.clip(n - 1 - half, 0, max(f - half, 0)), half, axis=-1)[..., ::-1]
    padded = jnp.concatenate([left, x, jnp.zeros_like(left)], axis=-1)  # [..., F + 2 * half]
    padded = jax.lax.dynamic_update_slice_in_dim(padded, right, n + half, axis=-1)  # x[n - 2] .. at n
    taps = [padded[..., k : k + f] for k in range(width)]
    for p in range(width):  # odd-even transposition sort: `width` passes sort `width` values
        for i in range(p % 2, width - 1, 2):
            taps[i], taps[i + 1] = jnp.minimum(taps[i], taps[i + 1]), jnp.maximum(taps[i], taps[i + 1])
    return jnp.where(n > half, taps[half], x)


def attention_matrix(scores: jax.Array, lengths: jax.Array, frames: jax.Array, width: int) -> jax.Array:
    """OpenAI's token x time matrix from the alignment heads' cross-attention scores.

    Softmax over the window's content positions only, z-scores over the row's tokens per head and
    position (population standard deviation), median filter along time, mean over heads.

    Args:
      scores: float32 ``[batch, heads, T, F]``, pre-softmax (``q k / sqrt(head_dim)``).
      lengths: int32 ``[batch]``, tokens per row (the rest is padding).
      frames: int32 ``[batch]``, content positions per row (``num_frames // 2``, at least 1).
      width: median filter width.
    Returns:
      float32 ``[batch, T, F]``; zeros past ``lengths`` and ``frames``.
    """
    frame_ok = (jnp.arange(scores.shape[-1])[None, :] < frames[:, None])[:, None, None, :]  # [batch, 1, 1, F]
    token_ok = (jnp.arange(scores.shape[-2])[None, :] < lengths[:, None])[:, None, :, None]  # [batch, 1, T, 1]
    weights = jax.nn.softmax(jnp.where(frame_ok, scores, -jnp.inf), axis=-1)
    count = jnp.maximum(lengths, 1).astype(jnp.float32)[:, None, None, None]
    mean = jnp.sum(jnp.where(token_ok, weights, 0.0), axis=-2, keepdims=True) / count
    centred = jnp.where(token_ok, weights - mean, 0.0)
    std = jnp.sqrt(jnp.sum(centred * centred, axis=-2, keepdims=True) / count)
    normed = jnp.where(std > 0, centred / jnp.where(std > 0, std, 1.0), 0.0)
    filtered = median_filter(normed, frames, width)
    # the mean over heads as a sum of slices: XLA:CPU ran jnp.mean over that axis 8x slower
    mean = sum(filtered[:, h] for h in range(filtered.shape[1])) / filtered.shape[1]  # [batch, T, F]
    return jnp.where(frame_ok[:, 0] & token_ok[:, 0], mean, 0.0)


@jax.jit
def dtw_trace(cost: jax.Array) -> jax.Array:
    """OpenAI's dynamic time warping over ``cost`` ``[batch, N, M]``, one anti-diagonal per step.

    Cell ``(i, j)`` of the accumulated cost (1-based, ``(0, 0)`` = 0, the rest of row and column 0
    infinite) adds ``cost[i - 1, j - 1]`` to the least of its diagonal (move 0), upper (1) and left
    (2) neighbours, with OpenAI's tie rule: 0 or 1 only when strictly less than both others, else
    2. The cells of one anti-diagonal depend only on the two before it, so each step is a vector
    operation; a row's cells ``(i <= n, j <= m)`` never read padding past ``n`` or ``m``.

    Returns:
      int8 ``[N + M, batch, N + 1]``: ``trace[i + j - 1, b, i]`` is the move into cell ``(i, j)``.
    """
    batch, n, m = cost.shape
    i = jnp.arange(n + 1)  # [N + 1]
    d = jnp.arange(1, n + m + 1)[:, None]  # [N + M, 1]
    j = d - i  # [N + M, N + 1]
    valid = (i >= 1) & (j >= 1) & (j <= m)
    skewed = cost[:, jnp.clip(i - 1, 0, n - 1), jnp.clip(j - 1, 0, m - 1)]  # [batch, N + M, N + 1]
    inf = jnp.full((batch, 1), jnp.inf, cost.dtype)

    def step(carry, inputs):
        before, last = carry  # accumulated costs of the two previous anti-diagonals, [batch, N + 1]
        x, ok = inputs
        c0 = jnp.concatenate([inf, before[:, :-1]], axis=1)  # (i - 1, j - 1)
        c1 = jnp.concatenate([inf, last[:, :-1]], axis=1)  # (i - 1, j)
        c2 = last  # (i, j - 1)
        t0 = (c0 < c1) & (c0 < c2)
        t1 = ~t0 & (c1 < c0) & (c1 < c2)
        total = jnp.where(ok, x + jnp.where(t0, c0, jnp.where(t1, c1, c2)), jnp.inf)
        return (last, total), jnp.where(t0, 0, jnp.where(t1, 1, 2)).astype(jnp.int8)

    first = jnp.where(i == 0, 0.0, jnp.inf).astype(cost.dtype)[None].repeat(batch, 0)  # anti-diagonal 0
    _, trace = jax.lax.scan(step, (jnp.full_like(first, jnp.inf), first), (skewed.transpose(1, 0, 2), valid))
    return trace


def backtrace(trace: np.ndarray, row: int, n: int, m: int) -> np.ndarray:
    """The path's entry position into each of the first ``n`` rows, from cell ``(n, m)`` back.

    Args:
      trace: :func:`dtw_trace`'s output (host array).
      row: the batch row.
      n, m: the row's real tokens and positions.
    Returns:
      int ``[n]``: for each token row, the first (smallest) time index the path visits in it,
      OpenAI's ``time_indices`` at its ``jumps``.
    """
    entry = np.zeros(n, np.int64)
    i, j = n, m
    while i > 0 or j > 0:
        if i > 0:
            entry[i - 1] = j - 1  # walking back, the last visit of a row is its entry
        move = 2 if i == 0 else 1 if j == 0 else trace[i + j - 1, row, i]
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    return entry


LOGIT_ROWS = 64  # text positions projected onto the vocabulary at once (a window's last chunk is padding)


def logit_rows(batch: int) -> int:
    """Rows per vocabulary projection in a pass over ``batch`` windows: a lone window's ~100
    text tokens waste less in chunks of 64; a batch's hundreds run ~13 % faster in 128s."""
    return LOGIT_ROWS if batch == 1 else 2 * LOGIT_ROWS


SCORES_BUDGET = 256 << 20  # bytes of the heads' scores of a whole batch, kept to be normalised at once


def _window_scores(module: Whisper, params, cross: tuple, tokens: jax.Array, heads: tuple):
    """One window's alignment heads' cross-attention scores ``[heads, T, F]`` and final hidden
    states ``[T, state]``, for ``cross`` its audio's keys/values (``Whisper.cross_kv`` of one
    row) and ``tokens`` ``[1, T]``."""
    hidden, scores = module.apply({"params": params}, tokens, cross, method="forward_with_scores")
    return jnp.stack([scores[layer][0, head] for layer, head in heads]), hidden[0]


def _from_start(matrices: jax.Array, starts: jax.Array) -> jax.Array:
    """Row ``b`` of ``matrices`` ``[batch, T, F]`` moved up by ``starts[b]`` rows (rows from
    ``<|notimestamps|>`` on); the rows this frees at the bottom repeat the last."""
    rows = jnp.clip(starts[:, None] + jnp.arange(matrices.shape[1])[None, :], 0, matrices.shape[1] - 1)
    return jnp.take_along_axis(matrices, rows[:, :, None], axis=1)


def _token_probs(module: Whisper, params, hidden: jax.Array, picks: jax.Array, targets: jax.Array,
                 count: jax.Array, eot: int, rows: int) -> jax.Array:
    """Probabilities (softmax over the text vocabulary) of ``targets`` after the hidden states
    ``hidden[picks]``, ``hidden`` ``[positions, state]``; only the first ``count`` picks are computed,
    ``rows`` at a time (the output projection is the costliest product of the pass)."""

    def chunk(c, out):
        idx = jax.lax.dynamic_slice_in_dim(picks, c * rows, rows)
        tgt = jax.lax.dynamic_slice_in_dim(targets, c * rows, rows)
        probs = module.apply({"params": params}, hidden[idx], tgt, eot, method="target_probs")
        return jax.lax.dynamic_update_slice_in_dim(out, probs, c * rows, 0)

    chunks = (count + rows - 1) // rows
    return jax.lax.fori_loop(0, chunks, chunk, jnp.zeros(picks.shape, jnp.float32))


@functools.partial(jax.jit, static_argnames=("module", "heads", "eot", "width"))
def alignment_pass(module: Whisper, params, cross: tuple, windows: jax.Array, tokens: jax.Array,
                   lengths: jax.Array, starts: jax.Array, frames: jax.Array, picks: jax.Array,
                   count: jax.Array, heads: tuple, eot: int, width: int):
    """One teacher-forced pass over each window's final tokens, and the DTW on its attention.

    Rows past ``windows`` are padding: they are not computed (a batch of 5 windows in a bucket of
    8 costs 5), and their outputs are unspecified.

    Args:
      module, params: the model.
      cross: the audio's cross-attention keys/values (``Whisper.cross_kv``), row ``b`` for
        window ``b``, as the decode made them: they are not computed again.
      windows: int32 scalar, the rows of ``tokens`` in use.
      tokens: int32 ``[batch, T]``: ``sot sequence, <|notimestamps|>, text, <|endoftext|>``, padded;
        row ``b`` decodes audio row ``b``.
      lengths: int32 ``[batch]``, real tokens per row.
      starts: int32 ``[batch]``, index of ``<|notimestamps|>`` (the sot sequence's length).
      frames: int32 ``[batch]``, content positions (``num_frames // 2``, at least 1).
      picks: int32 ``[P]`` (``P`` a multiple of ``logit_rows(batch)``), flat positions ``b * T + t`` of
        the tokens after which a text token comes; ``count`` of them are in use.
      heads: static ``((layer, head), ...)``, the alignment heads.
      eot: static end-of-text id; text ids are below it.
      width: static median filter width.
    Returns:
      ``(probs float32 [P], cost float32 [batch, T, F])``: each pick's next-token probability,
      and the DTW's cost (:func:`dtw_trace`), each row's matrix rows ``starts .. starts + T - 1``
      negated.
    """
    batch, length = tokens.shape
    n_heads, n_audio = len(heads), module.dims.n_audio_ctx
    # A batch's heads' scores are normalised and filtered at once after the loop when they fit
    # SCORES_BUDGET: window by window inside the loop, 8 windows of 96 tokens took 440-550 ms
    # instead of 314 (tiny.en, 2 cores). A lone window is faster inside (38-46 ms against 59-64).
    at_once = batch > 1 and batch * n_heads * length * n_audio * 4 <= SCORES_BUDGET
    kept = (batch, n_heads, length, n_audio) if at_once else (batch, length, n_audio)

    def window(b, carry):
        kept, hidden = carry
        scores, states = _window_scores(module, params,
                                        jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, b, 1), cross),
                                        jax.lax.dynamic_slice_in_dim(tokens, b, 1), heads)
        if not at_once:
            scores = attention_matrix(scores[None], lengths[b][None], frames[b][None], width)[0]
        return kept.at[b].set(scores), hidden.at[b].set(states)

    empty = (jnp.zeros(kept, jnp.float32), jnp.zeros((batch, length, module.dims.n_text_state), module.dtype))
    kept, hidden = jax.lax.fori_loop(0, windows, window, empty)
    matrices = _from_start(attention_matrix(kept, lengths, frames, width) if at_once else kept, starts)
    following = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1).reshape(-1)  # [batch * T]
    flat = hidden.reshape(batch * length, -1)  # [batch * T, state]
    probs = _token_probs(module, params, flat, picks, following[picks], count, eot, logit_rows(batch))
    return probs, -matrices


def alignment_heads(model) -> tuple[tuple[int, int], ...]:
    """The model's alignment heads, or OpenAI's default: every head of the last half of the
    decoder layers."""
    if model.alignment_heads is not None and len(model.alignment_heads):
        return tuple((int(layer), int(head)) for layer, head in np.asarray(model.alignment_heads))
    layers, heads = model.dims.n_text_layer, model.dims.n_text_head
    return tuple((layer, head) for layer in range(layers // 2, layers) for head in range(heads))


def _bucket(n: int, buckets: Sequence[int]) -> int:
    return next((b for b in buckets if n <= b), n)


@functools.partial(jax.jit, static_argnames=("module",))
def cross_kv(module: Whisper, params, audio: jax.Array) -> tuple:
    """``Whisper.cross_kv`` of encoder output ``audio`` (for callers that kept no decode's)."""
    return module.apply({"params": params}, audio, method="cross_kv")


@jax.jit
def _take_rows(cross: tuple, rows: jax.Array) -> tuple:
    return jax.tree.map(lambda x: x[rows], cross)


def align_tokens(model, audio, rows: Sequence[int], sot_sequences: Sequence[Sequence[int]],
                 texts: Sequence[Sequence[int]], num_frames: Sequence[int], width: int = 7):
    """Runs :func:`alignment_pass` for windows of a decoded batch.

    Args:
      model: a loaded model (``module``, ``params``, ``tokenizer``, ``dims``, ``alignment_heads``).
      audio: the batch's cross-attention keys/values as its decode made them
        (:meth:`~whisperjax_cli.window_decoder.WindowDecoder.decode_keeping_cross`), or its
        encoder output ``[batch, n_audio_ctx, state]`` (they are then computed from it); device
        arrays, not copied.
      rows: each window's row in ``audio``, all different.
      sot_sequences, texts: each window's start-of-transcript sequence and text tokens (no
        timestamps), at least one text token each.
      num_frames: each window's content mel frames.
      width: median filter width.
    Returns:
      Per window, ``(entry, probs)``: the time index (0.02 s) at which the path enters each of
      the ``len(text) + 1`` rows, and the probability of each text token.
    """
    tok = model.tokenizer
    if isinstance(audio, (jax.Array, np.ndarray)):
        audio = cross_kv(model.module, model.params, audio)
    batch = jax.tree.leaves(audio)[0].shape[0]
    seqs = [[*sot, tok.no_timestamps, *text, tok.eot] for sot, text in zip(sot_sequences, texts)]
    longest = max(len(s) for s in seqs)
    if longest > model.dims.n_text_ctx:
        raise ValueError(f"{longest} tokens exceed the decoder's context of {model.dims.n_text_ctx}")
    length = min(_bucket(longest, TOKEN_BUCKETS), model.dims.n_text_ctx)
    if len(set(rows)) != len(rows):
        raise ValueError(f"windows share rows of the encoder output: {list(rows)}")
    # Windows go in the order of their rows, so that in the usual case (rows 0 .. n - 1) the pass
    # reads `audio` in place; the rows after them are padding, which the pass skips.
    order = np.argsort(np.asarray(rows))
    tokens = np.full((batch, length), tok.eot, np.int32)
    lengths, starts, frames = (np.ones(batch, np.int32) for _ in range(3))
    picks = []
    for b, k in enumerate(order):
        tokens[b, : len(seqs[k])] = seqs[k]
        lengths[b], starts[b], frames[b] = len(seqs[k]), len(sot_sequences[k]), max(1, num_frames[k] // 2)
        picks += range(b * length + starts[b], b * length + starts[b] + len(texts[k]))
    if any(rows[k] != b for b, k in enumerate(order)):
        audio = _take_rows(audio, np.asarray([rows[k] for k in order] + [0] * (batch - len(rows)), np.int32))
    chunk = logit_rows(batch)
    flat = np.zeros(-(-batch * length // chunk) * chunk, np.int32)
    flat[: len(picks)] = picks
    probs, cost = alignment_pass(model.module, model.params, audio, np.int32(len(rows)), tokens, lengths, starts,
                                 frames, flat, np.int32(len(picks)), alignment_heads(model), tok.eot, width)
    # The DTW runs as a program of its own: XLA fused it with the pass's normalisation and median
    # filter, which made it ~200 ms instead of ~5 for 8 windows of 96 tokens (tiny.en, 2 cores).
    probs, trace = jax.device_get((probs, dtw_trace(cost)))
    out = [None] * len(rows)
    done = 0
    for b, k in enumerate(order):
        n = len(texts[k])
        out[k] = (backtrace(trace, b, n + 1, int(frames[b])), probs[done : done + n].astype(np.float64))
        done += n
    return out
