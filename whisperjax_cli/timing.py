"""Word-level timestamps: OpenAI's cross-attention alignment, then snapped to the audio.

How a window's words get their times (OpenAI's ``whisper/timing.py``, as faster-whisper runs it):

1. One jitted teacher-forced pass over ``sot sequence + <|notimestamps|> + text + <|endoftext|>``
   (``alignment_pass``), several windows at once, gives the alignment heads' cross-attention
   scores and each text token's probability. The scores are cropped to the window's content
   (``num_frames // 2`` encoder positions), softmaxed over them, normalised per head over the
   tokens (z-scores), median-filtered along time (width 7) and averaged over the heads.
2. Dynamic time warping over text tokens x audio positions (``dtw_trace``, a program of its
   own: fused into the pass, XLA made it 40x slower) and a host backtrace give the position
   where each token's row is entered. Steps 1 and 2 are :mod:`whisperjax_cli.alignment`; this
   module turns their rows into words (3 and 4).
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
from typing import Callable, Optional, Sequence

import numpy as np

from whisperjax_cli.alignment import align_tokens
from whisperjax_cli.errors import UsageError
from whisperjax_cli.results import Segment, Word
from whisperjax_cli.word_refine import pauses, refine_words

TOKENS_PER_SECOND = 50  # encoder positions per second: each covers 2 mel frames
PREPEND_PUNCTUATIONS = "\"'“¿([{-"  # openai-whisper's defaults
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END_MARKS = ".。!！?？"
UNSPACED_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})  # words are characters (OpenAI's list)


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


@dataclasses.dataclass
class WordTiming:
    """A word while it is being timed: times in seconds from the window's start."""

    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def _text_tokens(segment: Segment, eot: int) -> list[int]:
    return [int(t) for t in segment.tokens if t < eot]


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
