"""Long-form transcription: OpenAI's sequential algorithm, run on many streams at once.

A *stream* is a stretch of one file's audio decoded with OpenAI's loop: 30 s windows, seek
to the last timestamp, temperature fallback, no-speech skip, conditioning on the stream's
previous text. Each iteration decodes one window of up to ``batch_size`` streams in a single
batch, refilling a row as soon as its stream ends.

* ``mode="sequential"`` (accuracy, the default): one stream per file, exactly OpenAI's
  semantics; several files are still decoded side by side.
* ``mode="batched"`` (throughput, faster-whisper's batched pipeline in kind): the file's
  pauses are shortened (:func:`speech_spans`), what is left is cut at gaps into windows of
  15-30 s (:class:`WindowCuts`), and each window is decoded once, side by side with the others,
  its times mapped back to the file (:class:`Timeline`). By default without the previous text
  and at temperature 0 alone, as faster-whisper's; with ``condition_on_previous_text`` a row
  decodes a run of consecutive windows. The model may not end a window's text before its last
  sound (:func:`~whisperjax_cli.timestamps.hold_end_of_text`): at a cut 15-30 s in, it otherwise
  drops the window's last sentences a third of the time.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Iterator, Optional

import jax
import numpy as np

from whisperjax_cli.audio import SAMPLE_RATE, load_audio
from whisperjax_cli.decoding import language_logits, language_probs
from whisperjax_cli.features import HOP_LENGTH, N_FRAMES, N_SAMPLES, LogMelWindows, first_window, model_window
from whisperjax_cli.results import Segment, Transcript
from whisperjax_cli.window_decoder import DecodingOptions, LazyKey, WindowDecoder, build_prompt

FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second
SECONDS_PER_TOKEN = 0.02  # timestamp resolution: 2 mel frames per encoder position
MODES = ("sequential", "batched")


@dataclasses.dataclass
class _Stream:
    """OpenAI's per-file loop state, for one stretch ``clips`` of a file's mel."""

    file: int
    clips: list[tuple[int, int]]  # [start, end) mel frames to decode
    prompt: list[int]  # all_tokens (initial prompt included)
    prompt_reset_since: int = 0
    clip_index: int = 0
    seek: int = 0
    segments: list[Segment] = dataclasses.field(default_factory=list)
    done: bool = False
    packed: bool = False  # batched mode: each clip is a window, decoded once
    split: set = dataclasses.field(default_factory=set)  # clips that are halves of a looped window

    def __post_init__(self):
        self.seek = self.clips[0][0] if self.clips else 0
        self._advance()

    def _advance(self) -> None:
        """Moves past finished clips (OpenAI's clip loop); marks the stream done at the end."""
        while self.clip_index < len(self.clips):
            start, end = self.clips[self.clip_index]
            self.seek = max(self.seek, start)
            if self.seek < end:
                return
            self.clip_index += 1
        self.done = True

    @property
    def clip_end(self) -> int:
        return self.clips[self.clip_index][1]


@dataclasses.dataclass
class _File:
    index: int
    source: Any
    mel: LogMelWindows  # log-mel on demand, 30 s of zero audio appended (as OpenAI)
    content_frames: int  # of the audio decoded (in batched mode, the packed audio)
    language: Optional[str]
    language_probability: Optional[float]
    sot_sequence: tuple[int, ...]
    streams: list[_Stream]
    timeline: Optional[Timeline] = None  # batched mode: where the packed audio comes from
    source_frames: Optional[int] = None  # the file's own length, when packed
    cuts: Optional[WindowCuts] = None  # batched mode: where its windows end
    emitted: int = 0  # segments already handed out

    @property
    def duration(self) -> float:
        return (self.content_frames if self.source_frames is None else self.source_frames) / FRAMES_PER_SECOND

    def to_source(self, seconds: float, end: bool = False) -> float:
        return seconds if self.timeline is None else self.timeline.to_source(seconds, end)

    def window_size(self, s: _Stream) -> int:
        """Frames of the stream's next window: 30 s, or to its clip's end (a packed window's)."""
        return min(N_FRAMES, self.content_frames - s.seek, s.clip_end - s.seek)

    def hold(self, s: _Stream, size: int) -> int:
        """The timestamp index before which the model may not end a packed window: 1 s before
        the end of its last sound (see :func:`~whisperjax_cli.timestamps.hold_end_of_text`)."""
        end = self.cuts.sound_end(s.seek, s.seek + size) - s.seek
        return max(0, end - HOLD_MARGIN) // 2


@dataclasses.dataclass
class FileEvent:
    """What :func:`transcribe_files` yields: new segments of a file, its end, or its error."""

    index: int
    source: Any
    segments: list[Segment]
    transcript: Optional[Transcript] = None  # set once the file is complete
    error: Optional[Exception] = None
    language: Optional[str] = None


def parse_clip_timestamps(clip_timestamps, content_frames: int) -> list[tuple[int, int]]:
    """``"0"``, ``"10,20,40"`` or a list of seconds → [start, end) frame pairs (OpenAI)."""
    if isinstance(clip_timestamps, str):
        values = [float(t) for t in clip_timestamps.split(",") if t.strip()]
    else:
        values = [float(t) for t in (clip_timestamps or [0.0])]
    frames = [round(t * FRAMES_PER_SECOND) for t in values] or [0]
    if len(frames) % 2 == 1:
        frames.append(content_frames)
    return [(min(s, content_frames), min(e, content_frames)) for s, e in zip(frames[::2], frames[1::2])]


SILENCE_PEAK = 10 ** (-80 / 20)  # -80 dBFS: below any recording's noise floor


def is_digital_silence(samples: np.ndarray) -> bool:
    """True when a window's audio never rises above -80 dBFS (zeros, or dithering at most).

    Whisper reads such windows as speech often enough (" you", " Thank you.") with a
    log probability that OpenAI's no-speech rule accepts; they are skipped without decoding.
    """
    return samples.size == 0 or float(np.max(np.abs(samples))) < SILENCE_PEAK


ENERGY_BLOCK = 6000  # frames (60 s) per step of frame_energy


def frame_energy(audio: np.ndarray) -> np.ndarray:
    """Log power of each 10 ms frame (one value per mel frame), ``[len(audio) // 160]``."""
    n = len(audio) // HOP_LENGTH
    frames = audio[: n * HOP_LENGTH].reshape(n, HOP_LENGTH)
    energy = np.empty(n, np.float64)
    for i in range(0, n, ENERGY_BLOCK):  # in blocks: float64 temporaries of the whole file are 4x its audio
        block = frames[i : i + ENERGY_BLOCK].astype(np.float64)
        energy[i : i + ENERGY_BLOCK] = np.log10(np.mean(block * block, axis=1) + 1e-10)
    return energy


QUIET_BELOW_LEVEL = 3.5  # log10 power: 35 dB under the file's speech level is quiet
QUIET_FLOOR = -8.0  # the mean power of audio under -80 dBFS: quiet in any file
PAUSE_MIN = 30  # frames: a quiet run this long is a pause that packing shortens
PAUSE_KEEP = 20  # frames of a pause kept on each side of the speech around it
GAP_TIERS = (15, 8)  # frames: quiet runs where a window may end, longest first (sentences, words)
FILL_MIN = 1500  # frames: a packed window ends at a gap no earlier than 15 s in
CUT_SEARCH = 500  # frames: with no gap there, the quietest point of a window's last 5 s
BREAK_MIN = 500  # frames: a window ends where 5 s or more of the file were dropped
SPLIT_MIN = 500  # frames: what is left of a looping window is decoded again, as two if each half has 5 s
HOLD_MARGIN = 100  # frames: a packed window may end once a timestamp is within 1 s of its last sound


def quiet_frames(energy: np.ndarray) -> np.ndarray:
    """Which frames are quiet: 35 dB under the file's speech level (the 98th percentile of
    its ``energy``, :func:`frame_energy`) or under -80 dBFS. Noisy audio has few or none."""
    if not len(energy):
        return np.zeros(0, bool)
    return energy < max(float(np.percentile(energy, 98)) - QUIET_BELOW_LEVEL, QUIET_FLOOR)


def quiet_runs(quiet: np.ndarray) -> np.ndarray:
    """``[start, end)`` of each run of quiet frames, ``[runs, 2]``."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], quiet.astype(np.int8), [0]])))
    return edges.reshape(-1, 2)


def speech_spans(quiet: np.ndarray, start: int, end: int) -> list[tuple[int, int]]:
    """The frames of ``[start, end)`` worth decoding: all but the middle of its pauses.

    A run of ``quiet`` frames 0.3 s or longer is a pause: its first and last 0.2 s are kept,
    the rest dropped (a 60 s silence becomes 0.4 s, as a 1.2 s pause does); quiet at the
    range's ends is dropped but for the 0.2 s next to the speech. Audio with no quiet run
    keeps everything. Returns ``[start, end)`` spans in order, empty when all is quiet.
    """
    n = max(0, end - start)
    spans, kept = [], 0  # kept: where the audio not yet dropped begins
    for qs, qe in quiet_runs(quiet[start:end]).tolist():
        lo = 0 if qs == 0 else qs + PAUSE_KEEP  # drop [lo, hi)
        hi = n if qe == n else qe - PAUSE_KEEP
        if qe - qs < PAUSE_MIN or hi <= lo:
            continue
        if lo > kept:
            spans.append((start + kept, start + lo))
        kept = hi
    if kept < n:
        spans.append((start + kept, start + n))
    return spans


@dataclasses.dataclass(frozen=True)
class Timeline:
    """Spans of a file laid end to end (the audio batched mode decodes), and the way back."""

    spans: tuple[tuple[int, int], ...]  # [start, end) frames of the file, in order

    @functools.cached_property
    def packed_starts(self) -> np.ndarray:
        lengths = np.array([e - s for s, e in self.spans], np.int64)
        return np.concatenate([[0], np.cumsum(lengths)])

    @property
    def frames(self) -> int:
        return int(self.packed_starts[-1])

    def to_source(self, seconds: float, end: bool = False) -> float:
        """A packed time in seconds → the file's. A time on a seam is the next span's start,
        or with ``end`` the previous span's end (so a segment keeps to the speech it covers)."""
        if not self.spans:
            return seconds
        frame = seconds * FRAMES_PER_SECOND
        side = "left" if end else "right"
        i = int(np.clip(np.searchsorted(self.packed_starts, frame, side) - 1, 0, len(self.spans) - 1))
        return float(self.spans[i][0] + frame - self.packed_starts[i]) / FRAMES_PER_SECOND

    def audio(self, audio: np.ndarray) -> np.ndarray:
        return np.concatenate([audio[s * HOP_LENGTH : e * HOP_LENGTH] for s, e in self.spans] or [audio[:0]])

    def breaks(self, dropped: int) -> np.ndarray:
        """Packed frames where at least ``dropped`` frames of the file were left out."""
        gaps = np.array([b[0] - a[1] for a, b in zip(self.spans, self.spans[1:])], np.int64)
        return self.packed_starts[1:-1][gaps >= dropped]

    def frames_of(self, values: np.ndarray) -> np.ndarray:
        """Per-frame ``values`` of the file, those of the packed audio."""
        return np.concatenate([values[s:e] for s, e in self.spans] or [values[:0]])


class WindowCuts:
    """Where batched mode ends the windows of packed audio, from its frames' ``quiet`` and ``energy``.

    A window ends in the middle of the last gap that lies 15-30 s after its start: a quiet run
    of 0.15 s or more (a pause, the end of a sentence) if there is one, else one of 0.08 s (a
    comma, a breath between words), else the quietest 0.2 s of its last 5 s. It always ends at
    a ``break`` (where 5 s or more of the file were dropped): in one window the model reads the
    speech on both sides of a shortened silence as one segment, shown all through the silence.
    """

    def __init__(self, quiet: np.ndarray, energy: np.ndarray, breaks: np.ndarray = np.zeros(0, np.int64)):
        runs = quiet_runs(quiet)
        lengths, middles = runs[:, 1] - runs[:, 0], (runs[:, 0] + runs[:, 1]) // 2
        self.tiers = [middles[lengths >= n] for n in GAP_TIERS]
        self.smooth = np.convolve(energy, np.ones(20) / 20, mode="same") if len(energy) else energy
        self.quiet, self.breaks = quiet, np.asarray(breaks)

    def end(self, start: int, limit: int) -> int:
        """The end of the window that starts at ``start``, in a stretch that ends at ``limit``."""
        ahead = self.breaks[(self.breaks > start) & (self.breaks < limit)]
        limit = int(ahead.min()) if len(ahead) else limit
        if limit - start <= N_FRAMES:
            return limit
        for gaps in self.tiers:
            inside = gaps[(gaps >= start + FILL_MIN) & (gaps <= start + N_FRAMES)]
            if len(inside):
                return int(inside[-1])
        lo = start + N_FRAMES - CUT_SEARCH
        return lo + 1 + int(np.argmin(self.smooth[lo + 1 : start + N_FRAMES + 1]))

    def windows(self) -> list[tuple[int, int]]:
        """``[start, end)`` of every window, one after another, covering the packed audio."""
        total, out = len(self.smooth), []
        while not out or out[-1][1] < total:
            start = out[-1][1] if out else 0
            out.append((start, self.end(start, total)))
        return out if total else []

    def middle(self, start: int, stop: int) -> int:
        """Where to cut ``[start, stop)`` in two: the gap nearest its middle (the longest kind
        within its middle third), else the quietest 0.2 s there."""
        lo, hi = start + (stop - start) // 3, stop - (stop - start) // 3
        for gaps in self.tiers:
            inside = gaps[(gaps >= lo) & (gaps <= hi)]
            if len(inside):
                return int(inside[np.argmin(np.abs(inside - (start + stop) // 2))])
        return lo + int(np.argmin(self.smooth[lo:hi]))

    def sound_end(self, start: int, stop: int) -> int:
        """Where the last frame of ``[start, stop)`` that is not quiet ends (``start`` if none)."""
        loud = np.flatnonzero(~self.quiet[start:stop])
        return start + int(loud[-1]) + 1 if len(loud) else start


def loop_start(tokens: np.ndarray, timestamp_begin: int) -> int:
    """Where the repetition that a looping row ended in begins (every timestamp counted as
    the same token, as :func:`~whisperjax_cli.decoding.repeats_itself`); ``len(tokens)`` if
    its last ``LOOP_SPAN`` tokens do not repeat."""
    from whisperjax_cli.decoding import LOOP_MAX_PERIOD, LOOP_SPAN

    t = np.minimum(tokens, timestamp_begin)
    n = len(t)
    for p in range(1, LOOP_MAX_PERIOD + 1):
        if n >= LOOP_SPAN + p and np.array_equal(t[n - LOOP_SPAN :], t[n - LOOP_SPAN - p : n - p]):
            start = n - LOOP_SPAN - p
            while start > 0 and t[start - 1] == t[start - 1 + p]:
                start -= 1
            return start
    return n


def group_windows(windows: list, groups: int) -> list[list]:
    """``windows`` in ``groups`` runs of consecutive ones, as equal in number as can be."""
    groups = max(1, min(groups, len(windows)))
    bounds = [len(windows) * i // groups for i in range(groups + 1)]
    return [windows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


class Transcriber:
    """Runs the streams of many files through one :class:`WindowDecoder`."""

    def __init__(self, model, options: DecodingOptions, *, mode: str = "sequential", batch_size: int = 8,
                 condition_on_previous_text: Optional[bool] = None, initial_prompt: Optional[str] = None,
                 clip_timestamps="0", key: Optional[jax.Array] = None,
                 progress: Optional[Callable[[int, float, float], None]] = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.model, self.options, self.mode = model, options, mode
        self.batch_size = max(1, batch_size)
        self.decoder = WindowDecoder(model, options)
        # Batched mode decodes each window on its own by default, as faster-whisper's batched
        # pipeline: its windows are independent, so rows refill from any of them.
        self.condition = (mode == "sequential") if condition_on_previous_text is None else condition_on_previous_text
        tok = model.tokenizer
        self.initial_tokens = tok.encode(" " + initial_prompt.strip()) if initial_prompt else []
        self.clip_timestamps = clip_timestamps
        self.key = LazyKey(key)  # PRNGKey(0) when None; split only if sampling draws from it
        self.progress = progress

    # ------------------------------------------------------------ files and streams

    def open_file(self, index: int, source, sample_rate: Optional[int] = None) -> _File:
        if callable(source):  # a loader: the caller decodes lazily and names its own errors
            audio = source()
        elif isinstance(source, np.ndarray) and sample_rate is None:
            audio = source  # already 16 kHz mono
        else:
            audio = load_audio(source, sample_rate)
        source_frames, timeline = len(audio) // HOP_LENGTH, None
        clips = parse_clip_timestamps(self.clip_timestamps, source_frames)
        if self.mode == "batched":
            energy = frame_energy(audio)
            quiet = quiet_frames(energy)
            timeline = Timeline(tuple(span for s, e in clips for span in speech_spans(quiet, s, e)))
            energy, quiet = timeline.frames_of(energy), timeline.frames_of(quiet)
            cuts = WindowCuts(quiet, energy, timeline.breaks(BREAK_MIN))
            clips = cuts.windows()
            # All quiet: nothing to decode (one frame of zeros keeps the log-mel well defined).
            audio = timeline.audio(audio) if timeline.frames else np.zeros(HOP_LENGTH, np.float32)
        mel = LogMelWindows(audio, self.model.n_mels, padding=N_SAMPLES)
        content_frames = mel.n_frames - N_FRAMES
        language, probability = self._language(mel, content_frames)
        tok = self.model.tokenizer
        sot = tok.sot_sequence_for(language, self.options.task) if tok.multilingual else tuple(tok.sot_sequence)
        if self.mode == "batched":
            # Conditioned on previous text, a row decodes a run of consecutive windows; without,
            # every window is its own stream and rows refill from any of them.
            groups = group_windows(clips, self.batch_size) if self.condition else [[c] for c in clips]
            streams = [_Stream(index, g, list(self.initial_tokens), packed=True) for g in groups]
            return _File(index, source, mel, content_frames, language, probability, sot, streams, timeline,
                         source_frames, cuts)
        streams = [_Stream(index, clips, list(self.initial_tokens))]
        return _File(index, source, mel, content_frames, language, probability, sot, streams)

    def _language(self, mel: LogMelWindows, content_frames: int) -> tuple[Optional[str], Optional[float]]:
        tok = self.model.tokenizer
        if not tok.multilingual:
            return "en", None
        if self.options.language is not None:
            return self.options.language, None
        # The first window with zeros past the content, as faster-whisper does (OpenAI feeds the
        # log-mel of zero audio there instead). Like faster-whisper it keeps the frame centred
        # on the last sample too, so probabilities agree with it to ~1e-4.
        codes, probs = detect_language_mel(self.model, first_window(mel, content_frames, language_id=True)[None])
        best = int(np.argmax(probs[0]))
        return codes[best], float(probs[0, best])

    # ------------------------------------------------------------ one window of many streams

    def step(self, files: dict[int, _File], streams: list[_Stream]) -> None:
        """Decodes the next window of each stream (one batch) and advances them."""
        streams = [s for s in streams if not self._skip_if_silent(files[s.file], s)]
        mels, prompts, sizes, holds = [], [], [], []
        tail = None
        for s in streams:
            f = files[s.file]
            size = f.window_size(s)
            mels.append(model_window(f.mel, s.seek, size))
            prompt, tail = build_prompt(self.model.tokenizer, f.sot_sequence, s.prompt[s.prompt_reset_since :],
                                        self.options.without_timestamps, self.model.dims.n_text_ctx)
            prompts.append(prompt)
            sizes.append(size)
            holds.append(f.hold(s, size) if f.cuts is not None else 0)
        if not streams:
            return
        audio = self.decoder.encode(np.stack(mels))
        self.key, sub = self.key.split()
        results = self.decoder.decode(audio, len(streams), prompts, tail, sub,
                                      holds if self.mode == "batched" else None)
        for s, size, result in zip(streams, sizes, results):
            self._advance(files[s.file], s, size, result)

    def _skip_if_silent(self, f: _File, s: _Stream) -> bool:
        """Moves past a window of digital silence without decoding it (see is_digital_silence)."""
        size = f.window_size(s)
        if not is_digital_silence(f.mel.audio[s.seek * HOP_LENGTH : (s.seek + size) * HOP_LENGTH]):
            return False
        s.seek += size
        s._advance()
        return True

    def _advance(self, f: _File, s: _Stream, size: int, result) -> None:
        """OpenAI's per-window bookkeeping: skip silence, cut segments, move ``seek``."""
        o = self.options
        silent = o.no_speech_threshold is not None and result.no_speech_prob > o.no_speech_threshold
        if silent and o.logprob_threshold is not None and result.avg_logprob > o.logprob_threshold:
            silent = False  # confident text despite a high no-speech probability
        if silent:
            s.seek += size
            # OpenAI keeps the prompt across a skipped window. When the model did write text there
            # (" and the" at a low log probability), the prompt itself is often what misleads it,
            # and keeping it skipped window after window of speech (2.5 min in one benchmark run).
            if result.text.strip():
                s.prompt_reset_since = len(s.prompt)
        else:
            split = s.packed and result.looped and (s.seek, s.clip_end) not in s.split
            new, advance = self._segments(f, s, size, result, split)
            new = [g for g in new if g.start < g.end and g.text.strip()]
            if s.packed:  # no fallback to replace ". . . ." over noise: a segment without a letter or digit goes
                new = [g for g in new if any(c.isalnum() for c in g.text)]
            s.segments.extend(new)
            s.seek += advance
            if split:
                self._split(f, s)
            s.prompt.extend(t for g in new for t in g.tokens)
            # OpenAI resets the prompt after a high-temperature window; a window with no letter
            # or digit (". . . ." over noise) resets it too, or every later window repeats it.
            if not self.condition or result.temperature > 0.5 or not any(c.isalnum() for c in result.text):
                s.prompt_reset_since = len(s.prompt)
        s._advance()

    def _split(self, f: _File, s: _Stream) -> None:
        """The rest of a window that looped, as two windows cut at a gap near its middle: tiny.en
        loops on some 20-30 s windows from their first token ("NnNnNn...") and reads either
        half of the same audio right. The halves are not split again."""
        start, end = s.seek, s.clip_end
        if start >= end:
            return
        mid = f.cuts.middle(start, end) if end - start >= 2 * SPLIT_MIN else end
        halves = [(start, mid), (mid, end)] if mid < end else [(start, end)]
        s.clips[s.clip_index : s.clip_index + 1] = [(s.clips[s.clip_index][0], start), *halves]
        s.split.update(halves)

    def _segments(self, f: _File, s: _Stream, size: int, result, split: bool = False) -> tuple[list[Segment], int]:
        """Splits one window's tokens at timestamp pairs; returns (segments, frames to seek).

        A ``packed`` stream's window (batched mode) is decoded once: text after the last pair
        is a segment that ends with the window, and the stream moves on to its next window.
        A row that stopped in a loop keeps what it wrote before the repeats began; with
        ``split``, only its closed segments, and the stream moves to the last of their ends
        (the rest is decoded again, see :meth:`_split`).
        """
        seek = s.seek
        ts_begin = self.model.tokenizer.timestamp_begin
        tokens = np.asarray(result.tokens, np.int64)
        if s.packed and result.looped:
            tokens = tokens[: loop_start(tokens, ts_begin)]
        offset = seek / FRAMES_PER_SECOND
        is_ts = tokens >= ts_begin
        single_ending = len(tokens) >= 2 and not is_ts[-2] and is_ts[-1]
        consecutive = (np.flatnonzero(is_ts[:-1] & is_ts[1:]) + 1).tolist()
        segments = []
        if consecutive:
            slices = consecutive + ([len(tokens)] if single_ending else [])
            last = 0
            for cut in slices:
                part = tokens[last:cut]
                start = offset + (part[0] - ts_begin) * SECONDS_PER_TOKEN
                end = offset + (part[-1] - ts_begin) * SECONDS_PER_TOKEN
                segments.append(self._segment(f, seek, size, start, end, part, result))
                last = cut
            advance = size if single_ending else int(tokens[last - 1] - ts_begin) * 2
            if split:
                stamps = tokens[is_ts]
                return segments, min(int(stamps[-1] - ts_begin) * 2, size)
            if s.packed and not single_ending:
                rest = tokens[last:]
                if np.any(rest[1:] < self.model.tokenizer.eot):
                    start = offset + (rest[0] - ts_begin) * SECONDS_PER_TOKEN
                    end = offset + size / FRAMES_PER_SECOND
                    segments.append(self._segment(f, seek, size, start, end, rest, result))
                advance = size
        elif split:
            return [], 0
        else:
            duration = size / FRAMES_PER_SECOND
            stamps = tokens[is_ts]
            if len(stamps) and stamps[-1] != ts_begin:
                duration = (stamps[-1] - ts_begin) * SECONDS_PER_TOKEN
            segments.append(self._segment(f, seek, size, offset, offset + duration, tokens, result))
            advance = size
        return segments, advance

    def _segment(self, f: _File, seek, size, start, end, tokens: np.ndarray, result) -> Segment:
        # Past the window's content the model sees zero padding and may still place timestamps
        # there; clipping keeps every time inside the audio (and inside a packed window).
        limit = (seek + size) / FRAMES_PER_SECOND
        end = min(float(end), limit)
        start = min(float(start), end)
        end = f.to_source(end, end=True)
        start = min(f.to_source(start), end)
        if f.timeline is not None:
            seek = round(f.to_source(seek / FRAMES_PER_SECOND) * FRAMES_PER_SECOND)
        text_tokens = [int(t) for t in tokens if t < self.model.tokenizer.eot]
        return Segment(
            id=0, seek=seek, start=round(start, 3), end=round(end, 3),
            text=self.model.tokenizer.decode(text_tokens), tokens=[int(t) for t in tokens],
            temperature=result.temperature, avg_logprob=result.avg_logprob,
            compression_ratio=result.compression_ratio, no_speech_prob=result.no_speech_prob,
        )

    # ------------------------------------------------------------ the scheduler

    def run(self, sources: Iterable, sample_rate: Optional[int] = None) -> Iterator[FileEvent]:
        """Transcribes ``sources`` (paths, file objects or arrays), yielding events in file order
        per file; a file that cannot be read yields one event with ``error`` and the rest go on."""
        pending = iter(enumerate(sources))
        files: dict[int, _File] = {}
        exhausted = False
        while True:
            while not exhausted and sum(not s.done for f in files.values() for s in f.streams) < self.batch_size:
                nxt = next(pending, None)
                if nxt is None:
                    exhausted = True
                    break
                index, source = nxt
                try:
                    files[index] = self.open_file(index, source, sample_rate)
                except Exception as err:  # noqa: BLE001 - per-file isolation; the CLI reports it
                    yield FileEvent(index, source, [], error=err)
            active = [s for f in files.values() for s in f.streams if not s.done][: self.batch_size]
            if active:
                self.step(files, active)
            for index in sorted(files):
                event = self._flush(files[index])
                if event is not None:
                    yield event
                    if event.transcript is not None:
                        del files[index]
            if not active and exhausted and not files:
                return

    def _flush(self, f: _File) -> Optional[FileEvent]:
        """New segments of ``f`` in time order (streams in order, up to the first unfinished)."""
        ready: list[Segment] = []
        for s in f.streams:
            ready.extend(s.segments)
            if not s.done:
                break
        new = ready[f.emitted :]
        for i, g in enumerate(new, start=f.emitted):
            g.id = i
        f.emitted = len(ready)
        if self.progress is not None:
            done = sum(min(s.seek, s.clips[-1][1]) - s.clips[0][0] for s in f.streams if s.clips)
            if f.timeline is not None:  # packed frames: the same share of the file
                done = done * f.source_frames / max(1, f.content_frames)
            self.progress(f.index, done / FRAMES_PER_SECOND, f.duration)
        complete = all(s.done for s in f.streams)
        if not new and not complete:
            return None
        transcript = None
        if complete:
            segments = [g for s in f.streams for g in s.segments]
            transcript = Transcript(
                text="".join(g.text for g in segments), segments=segments, language=f.language,
                language_probability=f.language_probability, duration=round(f.duration, 3),
                model=self.model.name,
            )
        return FileEvent(f.index, f.source, new, transcript, language=f.language)


def detect_language_mel(model, mels: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """Language probabilities ``[batch, n_languages]`` for mel windows ``[batch, 3000, n_mels]``."""
    from whisperjax_cli.decoding import encode

    tok = model.tokenizer
    if not tok.multilingual:
        from whisperjax_cli.errors import UsageError

        raise UsageError(model.name, "English-only model: it cannot identify languages")
    audio = encode(model.module, model.params, np.asarray(mels, np.float32))
    logits = np.asarray(language_logits(model.module, model.params, audio, np.int32(tok.sot)))
    return tok.all_language_codes, language_probs(logits, np.asarray(tok.all_language_tokens))


_TRANSCRIBER_ARGS = ("mode", "batch_size", "condition_on_previous_text", "initial_prompt", "clip_timestamps",
                     "key", "progress")


def make_transcriber(model, **kwargs) -> Transcriber:
    """Splits keyword arguments between :class:`DecodingOptions` and :class:`Transcriber`.

    ``temperature`` may be a number or a tuple (the fallback list), as in openai-whisper.
    Batched mode decodes at temperature 0 alone unless ``temperature`` says otherwise, as
    faster-whisper's batched pipeline (which has no fallback at all).
    """
    from whisperjax_cli.tokenizer import normalize_language

    runner = {k: kwargs.pop(k) for k in _TRANSCRIBER_ARGS if k in kwargs}
    temperature = kwargs.pop("temperature", None)
    if temperature is None and runner.get("mode") == "batched":
        temperature = 0.0
    if temperature is not None:
        kwargs["temperatures"] = tuple(temperature) if isinstance(temperature, (list, tuple)) else (float(temperature),)
    if kwargs.get("language") is not None:
        kwargs["language"] = normalize_language(kwargs["language"])
        model.tokenizer.sot_sequence_for(kwargs["language"], kwargs.get("task", "transcribe"))
    return Transcriber(model, DecodingOptions(**kwargs), **runner)


def transcribe_files(model, sources: Iterable, sample_rate: Optional[int] = None, **kwargs) -> Iterator[FileEvent]:
    """Transcribes many inputs in one batched run; see :class:`Transcriber` for the options."""
    return make_transcriber(model, **kwargs).run(sources, sample_rate)


def transcribe_segments(model, audio, sample_rate: Optional[int] = None, **kwargs) -> Iterator[Segment]:
    """A lazy generator of one input's segments, yielded as they are decoded."""
    for event in transcribe_files(model, [audio], sample_rate, **kwargs):
        if event.error is not None:
            raise event.error
        yield from event.segments


def transcribe(model, audio, sample_rate: Optional[int] = None, **kwargs) -> Transcript:
    """Transcribes one input (a path, a binary file object, or an array with its sample rate).

    Keyword arguments are openai-whisper's (``language``, ``task``, ``temperature``, ``beam_size``,
    ``best_of``, ``patience``, ``length_penalty``, ``initial_prompt``,
    ``condition_on_previous_text``, ``compression_ratio_threshold``, ``logprob_threshold``,
    ``no_speech_threshold``, ``clip_timestamps``, ``without_timestamps``,
    ``max_initial_timestamp``, ``suppress_tokens``, ``suppress_blank``) plus ``mode``
    (``"sequential"``/``"batched"``), ``batch_size``, ``stop_loops`` (see
    :class:`~whisperjax_cli.window_decoder.DecodingOptions`) and an explicit PRNG ``key``.
    """
    if isinstance(model, str):
        from whisperjax_cli.models import load_model

        model = load_model(model)
    for event in transcribe_files(model, [audio], sample_rate, **kwargs):
        if event.error is not None:
            raise event.error
        if event.transcript is not None:
            return event.transcript
    raise RuntimeError("transcription ended without a result")  # unreachable: one input, one end
