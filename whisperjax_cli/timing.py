"""Word-level timestamps: OpenAI's cross-attention alignment, then snapped to the audio.

How a window's words get their times (OpenAI's ``whisper/timing.py``, as faster-whisper runs it):

1. One jitted teacher-forced pass over ``sot sequence + <|notimestamps|> + text + <|endoftext|>``
   (:func:`alignment_pass`), several windows at once, gives the alignment heads' cross-attention
   scores and each text token's probability. The scores are cropped to the window's content
   (``num_frames // 2`` encoder positions), softmaxed over them, normalised per head over the
   tokens (z-scores), median-filtered along time (width 7) and averaged over the heads.
2. Dynamic time warping over text tokens x audio positions (:func:`dtw_trace`, a program of its
   own: fused into the pass, XLA made it 40x slower) and a host backtrace give the position
   where each token's row is entered.
3. Words are the tokenizer's (spaces, or characters for CJK/Thai/Lao/Burmese); long words at
   sentence edges are clipped, punctuation merged (:func:`merge_punctuations`), and the first and
   last word of each segment reconciled with the segment's own timestamps (:func:`_fit_segment`).
4. Optionally (:attr:`WordOptions.refine`, on by default), the edges between words move onto
   the pauses of the audio within a small radius (:mod:`whisperjax_cli.word_refine`), as
   stable-ts does: OpenAI's edges are 20 ms steps of a smoothed attention map, often 0.1-0.3 s
   off, and the first word starts where the window does. On speech synthesised word by word
   with known boundaries (``bench/words.py``), it cut the mean start error from 200 to 56 ms
   (tiny.en) and from 269 to 36 ms (base), the end error from 217 to 57 and 110 to 39 ms.

:func:`add_word_timestamps` is the entry the transcription loop calls once per decoded batch.
OpenAI's decisions that use the words (where the next window starts,
``hallucination_silence_threshold``) are in :mod:`whisperjax_cli.word_decisions`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from whisperjax_cli.errors import UsageError
from whisperjax_cli.results import Segment, Word
from whisperjax_cli.word_refine import pauses, refine_words

if TYPE_CHECKING:
    from whisperjax_cli.model import Whisper

TOKENS_PER_SECOND = 50  # encoder positions per second: each covers 2 mel frames
PREPEND_PUNCTUATIONS = "\"'“¿([{-"  # openai-whisper's defaults
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END_MARKS = ".。!！?？"
UNSPACED_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})  # words are characters (OpenAI's list)
TOKEN_BUCKETS = (32, 64, 96, 128, 192, 256, 448)  # padded sequence lengths: a run compiles a few programs


@dataclasses.dataclass(frozen=True)
class WordOptions:
    """How words are timed. openai-whisper's names and defaults, plus the refinement's settings.

    Attributes:
      prepend_punctuations: marks merged into the word after them.
      append_punctuations: marks merged into the word before them.
      median_filter_width: odd width of the median filter along time (OpenAI's 7).
      refine: move word edges onto the pauses of the window's audio (:func:`refine_words`);
        False gives OpenAI's (and faster-whisper's) times exactly.
      refine_radius: seconds an edge may move when refined.
      min_pause: seconds of quiet that make a pause between words (shorter dips, such as the
        closure of a "t", are not one).
      quiet_db: a 10 ms frame is quiet this many dB under the window's speech level (its 95th
        percentile frame power), when no speech probabilities are given.
      speech_threshold: with per-frame speech probabilities (a VAD's), the probability from
        which a frame is speech.
    """

    prepend_punctuations: str = PREPEND_PUNCTUATIONS
    append_punctuations: str = APPEND_PUNCTUATIONS
    median_filter_width: int = 7
    refine: bool = True
    refine_radius: float = 0.3
    min_pause: float = 0.05
    quiet_db: float = 35.0
    speech_threshold: float = 0.5

    def __post_init__(self):
        for name in ("prepend_punctuations", "append_punctuations"):
            if not isinstance(getattr(self, name), str):
                raise UsageError(f"--{name.replace('_', '-')}", "must be a string")
        width = self.median_filter_width
        if isinstance(width, bool) or not isinstance(width, int) or width < 1 or width % 2 == 0:
            raise UsageError("median_filter_width", f"must be an odd number >= 1, not {width!r}")
        limits = {"refine_radius": (0.0, 2.0), "min_pause": (0.0, 1.0), "quiet_db": (1.0, 120.0),
                  "speech_threshold": (0.0, 1.0)}
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise UsageError(name, f"must be a number from {low} to {high}, not {value!r}")


@dataclasses.dataclass(eq=False)
class WindowWords:
    """One decoded window whose segments get words.

    Attributes:
      segments: the window's segments, in order. ``tokens`` may hold timestamps; ``start`` and
        ``end`` are the decoded times in seconds (the window's time base, see ``to_source``).
        :func:`add_word_timestamps` sets their ``words`` and, as OpenAI, moves ``start``/``end``
        to the first and last word.
      time_offset: seconds at the window's first frame (``seek / 100``).
      num_frames: mel frames of the window's content (``segment_size``), at most 3000.
      row: the window's row in the encoder output.
      sot_sequence: the prompt's start-of-transcript sequence (``<|startoftranscript|>``, and on a
        multilingual model the language and task).
      language: the window's language code; words of ``zh ja th lo my yue`` are characters.
      samples: the window content's 16 kHz audio, for the refinement (None: not refined).
      speech: speech probabilities per 10 ms frame of the content (a VAD's); used instead of
        the samples' frame energy when given.
      last_speech_timestamp: end of the last word before this window (OpenAI's carried value).
      to_source: maps a time of the window's time base to the file's, ``to_source(t, end)``
        (batched mode's packed audio); applied to every word and segment time at the end.
    """

    segments: list[Segment]
    time_offset: float
    num_frames: int
    row: int
    sot_sequence: tuple[int, ...]
    language: Optional[str] = None
    samples: Optional[np.ndarray] = None
    speech: Optional[np.ndarray] = None
    last_speech_timestamp: float = 0.0
    to_source: Optional[Callable[[float, bool], float]] = None


# --- the alignment pass (jitted) ----------------------------------------------------------------


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


# --- host side: from token rows to words ---------------------------------------------------------


@dataclasses.dataclass
class WordTiming:
    """A word while it is being timed: times in seconds from the window's start."""

    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def alignment_heads(model) -> tuple[tuple[int, int], ...]:
    """The model's alignment heads, or OpenAI's default: every head of the last half of the
    decoder layers."""
    if model.alignment_heads is not None and len(model.alignment_heads):
        return tuple((int(layer), int(head)) for layer, head in np.asarray(model.alignment_heads))
    layers, heads = model.dims.n_text_layer, model.dims.n_text_head
    return tuple((layer, head) for layer in range(layers // 2, layers) for head in range(heads))


def _bucket(n: int, buckets: Sequence[int]) -> int:
    return next((b for b in buckets if n <= b), n)


def _text_tokens(segment: Segment, eot: int) -> list[int]:
    return [int(t) for t in segment.tokens if t < eot]


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


def split_words(tokenizer, tokens: list[int], language: Optional[str]) -> tuple[list[str], list[list[int]]]:
    """The tokenizer's words of ``tokens``: characters for languages written without spaces."""
    if language is None:
        return tokenizer.split_to_word_tokens(tokens)
    if language in UNSPACED_LANGUAGES:
        return tokenizer.split_tokens_on_unicode(tokens)
    return tokenizer.split_tokens_on_spaces(tokens)


def word_timings(tokenizer, text: list[int], entry: np.ndarray, probs: np.ndarray,
                 language: Optional[str] = None) -> list[WordTiming]:
    """OpenAI's words from one window's alignment: a word starts where the path enters the row of
    its first token and ends where it enters the next word's; its probability is its tokens' mean.
    """
    words, word_tokens = split_words(tokenizer, text + [tokenizer.eot], language)
    if len(word_tokens) <= 1:  # only the end of text
        return []
    bounds = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    times = entry / TOKENS_PER_SECOND
    return [
        WordTiming(word, tokens, float(times[i]), float(times[j]), float(np.mean(probs[i:j])))
        for word, tokens, i, j in zip(words, word_tokens, bounds[:-1], bounds[1:])
    ]


def merge_punctuations(alignment: list[WordTiming], prepended: str, appended: str) -> None:
    """OpenAI's punctuation merging, in place: an opening mark (a separate word starting with a
    space) joins the word after it, a closing mark the word before it; the emptied entries stay
    with ``word == ""`` and no tokens (they keep their place, so tokens still add up)."""
    following = len(alignment) - 1
    for i in range(len(alignment) - 2, -1, -1):
        before, after = alignment[i], alignment[following]
        if before.word.startswith(" ") and before.word.strip() in prepended:
            after.word, after.tokens = before.word + after.word, before.tokens + after.tokens
            before.word, before.tokens = "", []
        else:
            following = i
    previous = 0
    for j in range(1, len(alignment)):
        before, after = alignment[previous], alignment[j]
        if not before.word.endswith(" ") and after.word in appended:
            before.word, before.tokens = before.word + after.word, before.tokens + after.tokens
            after.word, after.tokens = "", []
        else:
            previous = j


def typical_durations(alignment: list[WordTiming]) -> tuple[float, float]:
    """OpenAI's ``(median, max)`` word durations: the median of the non-zero ones capped at 0.7 s,
    and twice that."""
    durations = np.array([w.end - w.start for w in alignment])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    return median, 2 * median


def clip_sentence_edges(alignment: list[WordTiming], max_duration: float) -> None:
    """OpenAI's clip of long words at sentence boundaries, in place: a sentence-end mark lasts at
    most ``max_duration`` from its start, and the word after one at most that up to its end."""
    for i in range(1, len(alignment)):
        if alignment[i].end - alignment[i].start > max_duration:
            if alignment[i].word in SENTENCE_END_MARKS:
                alignment[i].end = alignment[i].start + max_duration
            elif alignment[i - 1].word in SENTENCE_END_MARKS:
                alignment[i].start = alignment[i].end - max_duration


def _fit_segment(segment: Segment, words: list[Word], median: float, max_duration: float,
                 last_speech: float) -> None:
    """OpenAI's reconciliation of a segment's first and last words with its timestamps, in place.

    After a pause (the first word ends more than four median durations after the last speech), a
    first word, or first two, longer than the usual cap are shortened from the left. A first word
    that starts more than 0.5 s before the segment's own start timestamp starts near it instead,
    and a last word ending 0.5 s after the segment's end ends near it; otherwise the segment's
    start and end become its first and last word's.
    """
    first = words[0]
    if first.end - last_speech > median * 4 and (
        first.end - first.start > max_duration
        or (len(words) > 1 and words[1].end - first.start > max_duration * 2)
    ):
        if len(words) > 1 and words[1].end - words[1].start > max_duration:
            boundary = max(words[1].end / 2, words[1].end - max_duration)
            first.end = words[1].start = boundary
        first.start = max(0, first.end - max_duration)
    if segment.start < first.end and segment.start - 0.5 > first.start:
        first.start = max(0, min(first.end - median, segment.start))
    else:
        segment.start = first.start
    last = words[-1]
    if segment.end > last.start and segment.end + 0.5 < last.end:
        last.end = max(last.start + median, segment.end)
    else:
        segment.end = last.end


def _window_words(tokenizer, window: WindowWords, entry: np.ndarray, probs: np.ndarray,
                  options: WordOptions) -> None:
    """OpenAI's ``add_word_timestamps`` for one window, from its alignment (see the module)."""
    eot = tokenizer.eot
    per_segment = [_text_tokens(s, eot) for s in window.segments]
    text = [t for tokens in per_segment for t in tokens]
    alignment = word_timings(tokenizer, text, entry, probs, window.language)
    median, max_duration = typical_durations(alignment)
    if median > 0:
        clip_sentence_edges(alignment, max_duration)
    merge_punctuations(alignment, options.prepend_punctuations, options.append_punctuations)
    last_speech = window.last_speech_timestamp
    index = 0
    for segment, tokens in zip(window.segments, per_segment):
        words, taken = [], 0
        while index < len(alignment) and taken < len(tokens):
            timing = alignment[index]
            if timing.word:
                words.append(Word(start=round(window.time_offset + timing.start, 2),
                                  end=round(window.time_offset + timing.end, 2),
                                  word=timing.word, probability=timing.probability))
            taken += len(timing.tokens)
            index += 1
        if words:
            _fit_segment(segment, words, median, max_duration, last_speech)
            last_speech = segment.end
        segment.words = words
    if options.refine:
        _refine_window(window, options)
    if window.to_source is not None:
        map_times(window.segments, window.to_source)


def _refine_window(window: WindowWords, options: WordOptions) -> None:
    """:func:`refine_words` over all the window's words; each segment then spans its words."""
    found = pauses(window.samples, window.speech, options)
    words = [w for s in window.segments for w in s.words or []]
    if not len(found) or not words:
        return
    refine_words(words, found + window.time_offset, options.refine_radius, window.time_offset)
    for word in words:
        word.start, word.end = round(word.start, 2), round(word.end, 2)
    for segment in window.segments:
        if segment.words:
            segment.start, segment.end = segment.words[0].start, segment.words[-1].end


def map_times(segments: list[Segment], to_source: Callable[[float, bool], float]) -> None:
    """Moves segment and word times from a window's time base to the file's, in place:
    ``to_source(seconds, end)`` (e.g. ``FileState.to_source`` of batched mode's packed audio)."""
    for segment in segments:
        segment.start, segment.end = to_source(segment.start, False), to_source(segment.end, True)
        for word in segment.words or []:
            word.start, word.end = to_source(word.start, False), to_source(word.end, True)


def add_word_timestamps(model, audio_features, windows: Sequence[WindowWords],
                        options: WordOptions = WordOptions()) -> None:
    """Sets ``words`` on every segment of ``windows``, from one alignment pass over them all.

    Args:
      model: the loaded model that decoded the windows.
      audio_features: the batch's cross-attention keys/values as its decode made them, or its
        encoder output ``[batch, n_audio_ctx, state]`` (see :func:`align_tokens`); each window's
        ``row`` indexes it. Not encoded again, and nothing is decoded again.
      windows: the decoded windows (see :class:`WindowWords`).
      options: see :class:`WordOptions`.
    """
    words_from_alignment(model, windows, align_windows(model, audio_features, windows, options), options)


def align_windows(model, audio_features, windows: Sequence[WindowWords], options: WordOptions = WordOptions()
                  ) -> list[Optional[tuple[np.ndarray, np.ndarray]]]:
    """:func:`align_tokens` over the text of each window's segments, in one pass (arguments as
    :func:`add_word_timestamps`'s). Returns per window ``(entry, probs)``, None for one without text."""
    eot = model.tokenizer.eot
    texts = [[t for s in w.segments for t in _text_tokens(s, eot)] for w in windows]
    todo = [k for k, text in enumerate(texts) if text]
    out: list = [None] * len(windows)
    if todo:
        aligned = align_tokens(model, audio_features, [windows[k].row for k in todo],
                               [windows[k].sot_sequence for k in todo], [texts[k] for k in todo],
                               [windows[k].num_frames for k in todo], options.median_filter_width)
        for k, alignment in zip(todo, aligned):
            out[k] = alignment
    return out


def words_from_alignment(model, windows: Sequence[WindowWords], aligned: Sequence[Optional[tuple]],
                         options: WordOptions = WordOptions()) -> None:
    """Sets ``words`` on every segment of ``windows`` from their :func:`align_windows`."""
    for window, alignment in zip(windows, aligned):
        if alignment is None:  # nothing to align: no words (OpenAI's empty alignment)
            for segment in window.segments:
                segment.words = []
            if window.to_source is not None:
                map_times(window.segments, window.to_source)
        else:
            _window_words(model.tokenizer, window, *alignment, options)
