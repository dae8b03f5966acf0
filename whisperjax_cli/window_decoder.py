"""The host side of decoding: a batch of 30 s windows with OpenAI's temperature fallback.

:class:`WindowDecoder` turns options into the static pieces of the jitted loop (masks,
:class:`~whisperjax_cli.decoding.LoopConfig`), pads prompts and batches to a few buckets so a
run compiles a handful of programs, and retries the rows that fail at the next temperature.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from whisperjax_cli.beam import beam_search_window
from whisperjax_cli.decoding import LOOP_SPAN, BeamConfig, DecodeInputs, LoopConfig, decode_window, encode, loop_start
from whisperjax_cli.options import TranscribeOptions
from whisperjax_cli.parallel import placement_of
from whisperjax_cli.profile import Timings, maybe
from whisperjax_cli.timestamps import TimestampConfig
from whisperjax_cli.tokenizer import TIME_PRECISION

Array = jax.Array
PROMPT_BUCKETS = (8, 232)  # left-padded prompt lengths (sot_prev + 223 + sot sequence fits)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def bucket(n: int, buckets) -> int:
    """The smallest bucket >= n; raises if ``n`` exceeds them all."""
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def left_pad(prompts: list[list[int]], length: int, fill: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to ``length``; returns ``(tokens [batch, length], pad [batch])``."""
    out = np.full((len(prompts), length), fill, np.int32)
    pad = np.zeros((len(prompts),), np.int32)
    for i, p in enumerate(prompts):
        out[i, length - len(p) :] = p
        pad[i] = length - len(p)
    return out, pad


def batch_bucket(n: int, multiple: int = 1) -> int:
    """Rows a batch of ``n`` windows is padded to (beyond the largest bucket: ``n`` itself),
    rounded up to a ``multiple`` of the devices the batch is spread over."""
    size = bucket(n, BATCH_BUCKETS) if n <= BATCH_BUCKETS[-1] else n
    return -(-size // multiple) * multiple


def vocab_mask(ids, vocab: int) -> np.ndarray:
    mask = np.zeros((vocab,), bool)
    mask[np.asarray(list(ids), np.int64)] = True
    return mask


@dataclasses.dataclass
class DecodingResult:
    tokens: list[int]  # sampled tokens before end-of-text
    text: str
    sum_logprob: float
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    compression_ratio: float
    looped: bool = False  # stopped while looping (TranscribeOptions.stop_loops): too repetitive


def compression_ratio(text: str) -> float:
    """Bytes over zlib-compressed bytes: high for repetitive (looping) text."""
    import zlib

    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def suppressed_ids(tokenizer, suppress_tokens) -> tuple[int, ...]:
    """OpenAI's expansion of ``"-1"``: non-speech symbols and the special tokens."""
    if isinstance(suppress_tokens, str):
        ids = [int(t) for t in suppress_tokens.split(",") if t.strip()]
    else:
        ids = list(suppress_tokens or ())
    if -1 in ids:
        ids = [t for t in ids if t >= 0] + list(tokenizer.non_speech_tokens)
    ids += [tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev,
            tokenizer.sot_lm, tokenizer.no_speech]
    return tuple(sorted(set(ids)))


def build_prompt(tokenizer, sot_sequence, previous: list[int], without_timestamps: bool, n_text_ctx: int):
    """``[sot_prev, *previous[-223:]] + sot_sequence (+ notimestamps)``; the sot offset from the end."""
    tokens = []
    if previous:
        tokens = [tokenizer.sot_prev, *previous[-(n_text_ctx // 2 - 1) :]]
    tail = list(sot_sequence) + ([tokenizer.no_timestamps] if without_timestamps else [])
    return tokens + tail, len(tail)


_UNUSED_KEY = np.zeros((2,), np.uint32)  # the key argument of greedy decoding, never read


@jax.jit
def take_rows(audio: Array, rows: np.ndarray) -> Array:
    """``audio[rows]`` as one program per shape (eager indexing was five: gather, and the
    broadcasts, add and select of normalizing the indices; each traced and compiled per process)."""
    return jnp.take(audio, rows, axis=0, mode="clip")


class LazyKey:
    """A PRNG key whose splits are replayed only when a key is drawn from.

    OpenAI's loop splits a key for every window and every temperature, yet greedy decoding
    never draws; each eager ``jax.random.split`` was a program that every new process compiled
    or fetched. ``split`` here is bookkeeping and :meth:`value` replays the splits with
    ``jax.random.split``, so a drawn key is the one the eager splits gave.
    """

    def __init__(self, key: Optional[Array] = None, *, parent: Optional["LazyKey"] = None, index: int = 0):
        self._key, self._parent, self._index, self._halves = key, parent, index, None

    def split(self) -> tuple["LazyKey", "LazyKey"]:
        return LazyKey(parent=self, index=0), LazyKey(parent=self, index=1)

    def value(self) -> Array:
        """The key itself (``jax.random.PRNGKey(0)`` for a root made without one)."""
        chain, node = [], self
        while node._key is None and node._parent is not None:
            chain.append(node)
            node = node._parent
        if node._key is None:
            node._key = _ROOT_KEY
        for node in reversed(chain):
            parent = node._parent
            if parent._halves is None:
                parent._halves = _split_key(parent._key)
            node._key, node._parent = parent._halves[node._index], None
        return self._key


_ROOT_KEY = np.zeros((2,), np.uint32)  # jax.random.PRNGKey(0): threefry's key of seed 0 is [0, 0]


@jax.jit
def _split_key(key: Array) -> tuple[Array, Array]:
    """``jax.random.split(key)`` as a pair, one program (eager, the split and each half's
    indexing were four programs per process)."""
    halves = jax.random.split(key)
    return halves[0], halves[1]


class WindowDecoder:
    """Decodes batches of 30 s mel windows with OpenAI's temperature fallback.

    Holds the model and the static pieces derived once from the options (masks, loop config);
    each call pads the batch to a bucket so a run compiles a handful of shapes. A model whose
    parameters live on a mesh of devices (:func:`~whisperjax_cli.parallel.place_model`) has
    each batch spread over them (:class:`~whisperjax_cli.parallel.DataParallel`).
    """

    def __init__(self, model, options: TranscribeOptions):
        tok = model.tokenizer
        self.model, self.options, self.tokenizer = model, options, tok
        self.placement = placement_of(model.params)  # None: one device
        self.multiple = 1 if self.placement is None else self.placement.size
        put = jax.device_put if self.placement is None else self.placement.whole
        vocab = model.dims.n_vocab
        # device_put, not jnp.asarray: that compiled a program for each mask in every new process.
        self.suppress_mask = put(vocab_mask(suppressed_ids(tok, options.suppress_tokens), vocab))
        blank = tok.encode(" ") + [tok.eot] if options.suppress_blank else []
        self.begin_mask = put(vocab_mask(blank, vocab))
        ts = None
        if not options.without_timestamps:
            max_initial = None
            if options.max_initial_timestamp is not None:
                max_initial = round(options.max_initial_timestamp / TIME_PRECISION)
            ts = TimestampConfig(tok.timestamp_begin, tok.eot, tok.no_timestamps, max_initial)
        self.config = LoopConfig(options.sample_len, tok.eot, tok.no_speech, ts,
                                 loop_span=LOOP_SPAN if options.stop_loops else 0)

    def encode(self, mels: np.ndarray) -> Array:
        """Encoder output for ``mels`` ``[batch, 3000, n_mels]``, batch padded to a bucket
        (padding rows past the last chunk holding a window are not encoded: zeros)."""
        n = mels.shape[0]
        size = batch_bucket(n, self.multiple)
        padded = np.zeros((size, *mels.shape[1:]), np.float32)
        padded[:n] = mels
        if self.placement is not None:
            return self.placement.encode(self.model.module, self.model.params, padded, np.int32(n))
        return encode(self.model.module, self.model.params, padded, np.int32(n))

    def decode(self, audio: Array, n: int, prompts: list[list[int]], tail: int, key,
               holds: Optional[list[int]] = None, timings: Optional[Timings] = None) -> list[DecodingResult]:
        """Decodes rows ``[0, n)`` of encoder output ``audio``, with fallback per row.

        ``key`` is a PRNG key or a :class:`LazyKey`; it is only drawn from when sampling.
        ``holds``: per row, the timestamp index before which end-of-text is held back
        (:func:`~whisperjax_cli.timestamps.hold_end_of_text`), or None (OpenAI's decoding).
        """
        return self.decode_keeping_cross(audio, n, prompts, tail, key, holds, timings, keep=False)[0]

    def decode_keeping_cross(self, audio: Array, n: int, prompts: list[list[int]], tail: int, key,
                             holds: Optional[list[int]] = None, timings: Optional[Timings] = None,
                             keep: bool = True) -> tuple[list[DecodingResult], Optional[tuple]]:
        """:meth:`decode`, and the audio's cross-attention keys/values (``Whisper.cross_kv``,
        row ``r`` for window ``r``) as the first decode made them, for word timing to reuse
        (computing them again was a fifth of its pass). None with ``keep`` False."""
        opts = self.options
        key = key if isinstance(key, LazyKey) else LazyKey(key)
        results: list[Optional[DecodingResult]] = [None] * n
        tried: list[list[DecodingResult]] = [[] for _ in range(n)]
        todo = list(range(n))
        cross = None
        for temperature in opts.temperatures:
            if not todo:
                break
            key, sub = key.split()
            first = len(todo) == n and not any(tried)
            with maybe(timings, "decode" if first else "fallback decode"):
                rows, out = self._decode_rows(audio, todo, [prompts[r] for r in todo], tail, temperature, sub,
                                              None if holds is None else [holds[r] for r in todo], keep and first)
            if first:
                cross = out
            retry = []
            for r, res in zip(todo, rows):
                results[r] = res
                tried[r].append(res)
                if self._needs_fallback(res):
                    retry.append(r)
            todo = retry
        for r in todo:  # every temperature failed
            results[r] = self._fallback_choice(tried[r])
        return results, cross  # type: ignore[return-value]

    def _fallback_choice(self, tried: list[DecodingResult]) -> DecodingResult:
        """The result kept when every temperature failed: faster-whisper's choice, the most
        likely (average log probability) of those not too repetitive, or of all if none is.

        OpenAI keeps the last, temperature-1.0 sample, often noise. Like faster-whisper, the
        kept result reports the last temperature, so the prompt reset after it still applies.
        """
        limit = self.options.compression_ratio_threshold
        fine = [r for r in tried if not r.looped and (limit is None or r.compression_ratio <= limit)]
        best = max(fine or tried, key=lambda r: r.avg_logprob)
        return dataclasses.replace(best, temperature=tried[-1].temperature)

    def _needs_fallback(self, r: DecodingResult) -> bool:
        o = self.options
        too_repetitive = r.looped or (
            o.compression_ratio_threshold is not None and r.compression_ratio > o.compression_ratio_threshold)
        too_unlikely = o.logprob_threshold is not None and r.avg_logprob < o.logprob_threshold
        silence = (
            o.no_speech_threshold is not None and r.no_speech_prob > o.no_speech_threshold
            and o.logprob_threshold is not None and r.avg_logprob < o.logprob_threshold
        )
        return (too_repetitive or too_unlikely) and not silence

    def _decode_rows(self, audio, rows, prompts, tail, temperature, key, holds=None,
                     keep_cross: bool = False) -> tuple[list[DecodingResult], Optional[tuple]]:
        """One decode of ``rows``; with ``keep_cross``, also the cross keys/values it made."""
        opts = self.options
        # best-of samples of one window are consecutive rows sharing its audio (a group).
        repeat = opts.best_of if temperature > 0 and opts.best_of else 1
        size = batch_bucket(len(rows), self.multiple)
        gather = np.asarray(rows + [rows[0]] * (size - len(rows)))
        prompt_len = bucket(max(len(p) for p in prompts), PROMPT_BUCKETS)
        padded, pad = left_pad([p for p in prompts + [prompts[0]] * (size - len(rows)) for _ in range(repeat)],
                               prompt_len, self.tokenizer.eot)
        if audio.shape[0] != size or np.any(gather != np.arange(size)):  # else every row is in place
            audio = take_rows(audio, gather.astype(np.int32))
        hold = None
        if holds is not None and self.config.timestamps is not None:
            hold = np.repeat(np.asarray(holds + [holds[0]] * (size - len(rows)), np.int32), repeat)
        # numpy arguments: jit moves them; eager jnp scalars and arrays were each a program to compile.
        if temperature == 0 and opts.beam_size:
            # Finishing only top-ranked endings (CTranslate2's rule) keeps long-form beam search
            # from ending windows early; OpenAI's rule stays available in beam.py and tested.
            beam = BeamConfig(opts.beam_size, opts.patience, opts.length_penalty, finish_top_only=True)
            config = dataclasses.replace(self.config, beam=beam, keep_cross=keep_cross)
        else:
            config = dataclasses.replace(self.config, sample=temperature > 0, group=repeat, keep_cross=keep_cross)
        draw = key.value() if config.sample else _UNUSED_KEY  # greedy and beam search never draw
        inputs = DecodeInputs(audio, padded, pad, np.int32(prompt_len - tail), self.suppress_mask, self.begin_mask,
                              np.float32(temperature), draw, hold)
        program = decode_window if config.beam is None else beam_search_window
        if self.placement is not None:
            out = self.placement.decode(program, self.model.module, self.model.params, inputs, config)
        else:
            out = program(self.model.module, self.model.params, inputs, config)
        tokens, sums, no_speech, looped = jax.device_get((out.tokens, out.sum_logprobs, out.no_speech_prob, out.looped))
        looped = np.zeros(len(sums), bool) if looped is None else looped  # beam search: never stopped
        results = [self._result(tokens[j], sums[j], no_speech[j], temperature, bool(looped[j]))
                   for j in range(len(rows) * repeat)]
        if config.beam is not None and config.loop_span:
            results = [self._ends_looping(r) for r in results]
        return [self._best(results[k * repeat : (k + 1) * repeat]) for k in range(len(rows))], out.cross

    def _result(self, tokens: np.ndarray, sum_logprob: float, no_speech: float, temperature: float,
                looped: bool = False):
        eot = np.flatnonzero(tokens == self.tokenizer.eot)
        ids = tokens[: eot[0] if len(eot) else len(tokens)].tolist()
        text = self.tokenizer.decode(ids)
        # The compression ratio of the stripped text, as OpenAI's and faster-whisper's.
        return DecodingResult(ids, text, float(sum_logprob), float(sum_logprob) / (len(ids) + 1),
                              float(no_speech), temperature, compression_ratio(text.strip()), looped)

    def _ends_looping(self, r: DecodingResult) -> DecodingResult:
        """A beam's sequence that ended in a loop is looped, whether it finished or was running.

        Beam search stops an audio once its best running beam loops (``beam.beam_loop``); a
        sequence that finished before then may end in the same loop (" HTTP, W-W-W-...-W" then
        end-of-text: 64 tokens, compression ratio 2.0). OpenAI's search, run on to 224 tokens,
        most often ranks the loop first, fails the compression check and falls back; kept, the
        loop's text is the window's. Greedy rows are judged so already (``decoding.loops``)."""
        if r.looped or loop_start(np.asarray(r.tokens), self.tokenizer.timestamp_begin) == len(r.tokens):
            return r
        return dataclasses.replace(r, looped=True)

    def _best(self, candidates: list[DecodingResult]) -> DecodingResult:
        """OpenAI's MaximumLikelihoodRanker: sum logprob over a length penalty."""
        lp = self.options.length_penalty

        def score(r: DecodingResult) -> float:
            n = len(r.tokens)
            penalty = n if lp is None else ((5 + n) / 6) ** lp
            return r.sum_logprob / max(penalty, 1e-9)

        return max(candidates, key=score)
