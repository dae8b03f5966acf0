"""Long-form transcription: OpenAI's sequential algorithm, run on many streams at once.

A *stream* is a stretch of one file's audio decoded with OpenAI's loop: 30 s windows, seek
to the last timestamp, temperature fallback, no-speech skip, conditioning on the stream's
previous text. Each iteration decodes one window of up to ``batch_size`` streams in a single
batch, refilling a row as soon as its stream ends.

* ``mode="sequential"`` (accuracy, the default): one stream per file, exactly OpenAI's
  semantics; several files are still decoded side by side.
* ``mode="batched"`` (throughput, faster-whisper's batched pipeline in kind): with the VAD (the
  default) the speech it finds is laid end to end (:class:`~whisperjax_cli.packing.Timeline`,
  which maps times back to the file) in windows of whole VAD chunks
  (:func:`~whisperjax_cli.packing.vad_windows`), and a segment read across a long stretch left
  out is cut there (:mod:`~whisperjax_cli.seams`); without it pauses are shortened
  (:func:`~whisperjax_cli.packing.speech_spans`) and what is left is cut at gaps into windows of
  15-30 s (:class:`~whisperjax_cli.packing.WindowCuts`). Each window is decoded once, side by
  side with the others, by default without the previous text and at temperature 0 alone, as
  faster-whisper's; with ``condition_on_previous_text`` a row decodes a run of consecutive
  windows. The model may not end a window's text before 1 s before its end or its last sound
  (:func:`~whisperjax_cli.timestamps.hold_end_of_text`): it otherwise drops a window's last
  sentences a third of the time.

A window's tokens become segments in :mod:`~whisperjax_cli.window_segments`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional

import jax
import numpy as np

from whisperjax_cli.audio import load_audio
from whisperjax_cli.features import (FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES, N_SAMPLES, LogMelWindows, first_window,
                                     model_window)
from whisperjax_cli.profile import Timings, maybe
from whisperjax_cli.readahead import ReadAhead, next_windows
from whisperjax_cli.packing import (Timeline, WindowCuts, chunk_timeline, frame_energy, group_windows, quiet_frames,
                                   speech_spans, vad_windows)
from whisperjax_cli.results import Segment, Transcript
from whisperjax_cli.runtime import default_device, programs_may_overlap
from whisperjax_cli.seams import Piece, crosses_break, cut_window
from whisperjax_cli.streams import HOLD_MARGIN, FileEvent, FileState, Stream, parse_clip_timestamps
from whisperjax_cli.language import detect_language_mel
from whisperjax_cli.options import TranscribeOptions, options_from
from whisperjax_cli.window_decoder import LazyKey, WindowDecoder, batch_bucket, build_prompt, take_rows
from whisperjax_cli.window_segments import to_file, window_segments



SILENCE_PEAK = 10 ** (-80 / 20)  # -80 dBFS: below any recording's noise floor


def is_digital_silence(samples: np.ndarray) -> bool:
    """True when a window's audio never rises above -80 dBFS (zeros, or dithering at most).

    Whisper reads such windows as speech often enough (" you", " Thank you.") with a
    log probability that OpenAI's no-speech rule accepts; they are skipped without decoding.
    """
    return samples.size == 0 or float(np.max(np.abs(samples))) < SILENCE_PEAK


SPLIT_MIN = 500  # frames: what is left of a looping window is decoded again, as two if each half has 5 s


class Cancelled(Exception):
    """The error of a file's :class:`~whisperjax_cli.streams.FileEvent` when
    :meth:`Transcriber.cancel` stopped it."""


class Transcriber:
    """Runs the streams of many files through one :class:`WindowDecoder`."""

    def __init__(self, model, options: Optional[TranscribeOptions] = None, *, key: Optional[jax.Array] = None,
                 progress: Optional[Callable[[int, float, float], None]] = None, timings: Optional[Timings] = None):
        """Args:
          model: a loaded :class:`~whisperjax_cli.loading.WhisperModel`.
          options: what to decode and how (defaults: :class:`TranscribeOptions`'s).
          key: PRNG key for sampling at temperature > 0 (``PRNGKey(0)`` when None).
          progress: called as ``progress(file_index, done_seconds, total_seconds)``.
          timings: where to add the time of each phase (:mod:`whisperjax_cli.profile`), or None.
        """
        options = TranscribeOptions() if options is None else options
        if options.language is not None:  # an English-only model refuses other languages here
            model.tokenizer.sot_sequence_for(options.language, options.task)
        self.model, self.options, self.mode = model, options, options.mode
        self.batch_size = options.batch_size
        self.decoder = WindowDecoder(model, options)
        # Batched mode decodes each window on its own by default, as faster-whisper's batched
        # pipeline: its windows are independent, so rows refill from any of them.
        self.condition = options.condition_on_previous_text
        tok = model.tokenizer
        prompt = options.initial_prompt
        self.initial_tokens = tok.encode(" " + prompt.strip()) if prompt else []
        self.clip_timestamps = options.clip_timestamps
        self.key = LazyKey(key)  # PRNGKey(0) when None; split only if sampling draws from it
        self.progress = progress
        self.timings = timings
        self._vad_params = None  # Silero VAD's weights, loaded when first needed
        self._hold = self.mode == "batched"  # see _hold_index
        self._runs: list[dict] = []  # each running feed's open files, key -> FileState (read by cancel)
        # Batched mode without the previous text knows every window before decoding any: the
        # next step's windows are encoded on a thread while a step decodes (see readahead.py),
        # where two programs may run at once (runtime.programs_may_overlap).
        ahead = self.mode == "batched" and not self.condition and programs_may_overlap(default_device().platform)
        self._ahead = ReadAhead(self.decoder.encode) if ahead else None
        self._cancelled: set = set()  # keys cancel() was given, handled at the run's next turn

    def cancel(self, key) -> bool:
        """Stops transcribing the open file ``key`` (the key ``take`` gave it in :meth:`run_feed`,
        or its position in :meth:`run`); safe to call from any thread.

        The file's rows leave the batch at the run's next turn (a decode step under way is not
        interrupted) and it ends with one event whose ``error`` is :class:`Cancelled`; other
        files go on. Returns False, doing nothing, when no file of that key is open (not handed
        over yet, or finished).
        """
        if not any(key in files for files in list(self._runs)):
            return False
        self._cancelled.add(key)
        return True

    @property
    def open_files(self) -> int:
        """Files a run has open now (being decoded, or waiting for a free row)."""
        return sum(len(files) for files in list(self._runs))

    # ------------------------------------------------------------ files and streams

    def open_file(self, index: int, source, sample_rate: Optional[int] = None) -> FileState:
        with maybe(self.timings, "audio decode"):
            if callable(source):  # a loader: the caller decodes lazily and names its own errors
                audio = source()
            elif isinstance(source, np.ndarray) and sample_rate is None:
                audio = source  # already 16 kHz mono
            else:
                audio = load_audio(source, sample_rate)
        source_frames, timeline, cuts = len(audio) // HOP_LENGTH, None, None
        clips = parse_clip_timestamps(self.clip_timestamps, source_frames)
        if self.mode == "batched":
            energy = frame_energy(audio)
            quiet = quiet_frames(energy)
        if self.options.vad_filter:
            with maybe(self.timings, "vad"):
                timeline = self._vad_timeline(audio, clips)
        elif self.mode == "batched":  # the energy gate: pauses shortened
            timeline = Timeline(tuple(span for s, e in clips for span in speech_spans(quiet, s, e)))
        if self.mode == "batched":
            energy, quiet = timeline.frames_of(energy), timeline.frames_of(quiet)
            cuts = WindowCuts(quiet, energy, timeline.breaks)
            clips = vad_windows(timeline) if self.options.vad_filter else cuts.windows()
        elif timeline is not None:
            clips = [(0, timeline.frames)]
        if timeline is not None:
            # Nothing but speech is decoded. All quiet: nothing at all (one frame of zeros keeps
            # the log-mel well defined).
            audio = timeline.audio(audio) if timeline.frames else np.zeros(HOP_LENGTH, np.float32)
        mel = LogMelWindows(audio, self.model.n_mels, padding=N_SAMPLES)
        content_frames = mel.n_frames - N_FRAMES
        with maybe(self.timings, "language"):
            language, probability, first_audio = self._language(mel, content_frames)
        tok = self.model.tokenizer
        sot = tok.sot_sequence_for(language, self.options.task) if tok.multilingual else tuple(tok.sot_sequence)
        if self.mode == "batched":
            # Conditioned on previous text, a row decodes a run of consecutive windows; without,
            # every window is its own stream and rows refill from any of them.
            groups = group_windows(clips, self.batch_size) if self.condition else [[c] for c in clips]
            streams = [Stream(index, g, list(self.initial_tokens), packed=True) for g in groups]
        else:
            streams = [Stream(index, clips, list(self.initial_tokens))]
        return FileState(index, source, mel, content_frames, language, probability, sot, streams, timeline,
                         None if timeline is None else source_frames, cuts, first_audio=first_audio)

    def _vad_timeline(self, audio: np.ndarray, clips: list[tuple[int, int]]) -> Timeline:
        """Silero VAD's speech segments (faster-whisper's rules, ``options.vad_parameters``)
        inside ``clips``, as mel frames, in order: a timeline of them, touching ones joined."""
        from whisperjax_cli.vad import speech_timestamps

        if self._vad_params is None:
            from whisperjax_cli.vad_weights import load_weights

            self._vad_params = load_weights()
        speech = speech_timestamps(audio, self.options.vad_parameters, params=self._vad_params)
        # To the nearest frame: rounding outward moved every later join of the packed audio
        # (by 74 ms at the ninth join of bench/nonspeech.py's audio).
        chunks = [(round(c["start"] / HOP_LENGTH), round(c["end"] / HOP_LENGTH)) for c in speech]
        return chunk_timeline(chunks, clips)

    def _language(self, mel: LogMelWindows, content_frames: int):
        """``(language, probability, encoder output)``: the last is that of frames ``[0,
        N_FRAMES)`` when language detection encoded exactly them (a file of 30 s or more), for
        the first window to decode without encoding it again (base, 30-60 s clips one at a time:
        one encoder pass in three), else None."""
        tok = self.model.tokenizer
        if not tok.multilingual:
            return "en", None, None
        if self.options.language is not None:
            return self.options.language, None, None
        # The first window with zeros past the content, as faster-whisper does (OpenAI feeds the
        # log-mel of zero audio there instead). Like faster-whisper it keeps the frame centred
        # on the last sample too, so probabilities agree with it to ~1e-4.
        codes, probs, audio = detect_language_mel(self.model, first_window(mel, content_frames, language_id=True)[None],
                                                  keep_audio=True)
        best = int(np.argmax(probs[0]))
        whole = content_frames >= N_FRAMES and self.decoder.placement is None  # what window_size(0) is then
        return codes[best], float(probs[0, best]), audio if whole else None

    # ------------------------------------------------------------ one window of many streams

    def step(self, files: dict[int, FileState], streams: list[Stream]) -> None:
        """Decodes the next window of each stream (one batch) and advances them."""
        streams = [s for s in streams if not self._skip_if_silent(files[s.file], s)]
        mels, prompts, sizes, holds = [], [], [], []
        tail = None
        for s in streams:
            f = files[s.file]
            size = f.window_size(s)
            with maybe(self.timings, "mel"):
                mels.append(model_window(f.mel, s.seek, size))
            prompt, tail = build_prompt(self.model.tokenizer, f.sot_sequence, s.prompt[s.prompt_reset_since :],
                                        self.options.without_timestamps, self.model.dims.n_text_ctx)
            prompts.append(prompt)
            sizes.append(size)
            holds.append(self._hold_index(f, s, size) if f.cuts is not None else None)
        if not streams:
            return
        keys = [(id(s), s.seek, size) for s, size in zip(streams, sizes)]
        with maybe(self.timings, "encoder"):
            audio, ahead = None, [None] * len(streams)
            if self._ahead is not None:
                audio, ahead = self._ahead.take(keys)
            known = [files[s.file].take_first_audio(s, size) for s, size in zip(streams, sizes)]  # let go either way
            if audio is None:
                audio = self._encode(mels, [k if k is not None else a for k, a in zip(known, ahead)])
            if self.timings is not None:
                audio.block_until_ready()  # else its device time lands in the decode phase
        if self._ahead is not None:  # the next step's windows, encoded while this one decodes
            self._ahead.start(*next_windows(files, streams, self.batch_size), after=audio)
        self.key, sub = self.key.split()
        # With word timestamps the decode hands back the audio's cross-attention keys/values: the
        # alignment pass reads them instead of computing them again.
        holds = holds if self._hold else None  # a mode's files all have cuts or none
        results, cross = self.decoder.decode_keeping_cross(audio, len(streams), prompts, tail, sub, holds,
                                                           self.timings, keep=self.options.word_timestamps)
        if self.options.word_timestamps:
            with maybe(self.timings, "words"):
                decided = self._words(files, streams, sizes, results, cross)
        else:
            with maybe(self.timings, "seams"):
                decided = self._cut_breaks(files, streams, sizes, results, audio)
        with maybe(self.timings, "host"):
            for s, size, result, words in zip(streams, sizes, results, decided):
                if words is not False:  # False: decoded again from where word_seek moved it
                    self._advance(files[s.file], s, size, result, words)

    def _encode(self, mels: list[np.ndarray], known: list) -> jax.Array:
        """Encoder output of the step's windows, padded to a batch bucket; a window whose
        output is ``known`` (language detection's) is not encoded again."""
        todo = [m for m, k in zip(mels, known) if k is None]
        if len(todo) == len(mels):
            return self.decoder.encode(np.stack(mels))
        if len(mels) == 1:  # a file alone (batch bucket 1): the detection's output as it is, on the device
            return jax.device_put(known[0])
        # Several windows (a step of many files, once per file): assembled on the host, so that no
        # program is made for each mix of shapes.
        fresh = iter(np.asarray(self.decoder.encode(np.stack(todo)))) if todo else iter(())
        out = None
        for i, k in enumerate(known):
            row = next(fresh) if k is None else np.asarray(k)[0]
            if out is None:
                out = np.zeros((batch_bucket(len(mels), self.decoder.multiple), *row.shape), row.dtype)
            out[i] = row
        return jax.device_put(out)

    def _hold_index(self, f: FileState, s: Stream, size: int) -> int:
        """The timestamp index before which a packed window may not end. A window of up to 30 s
        of several sentences is often ended early by the model (tiny.en dropped the last
        sentences of a third of them). The energy gate's windows hold on to 1 s before their
        last sound (:meth:`FileState.hold`); the VAD's, to 1 s before their end, which is the
        end of a VAD chunk. On bench/longform.py's 27 windows (tiny.en) none is left to decode on
        from where the model stopped (4 were when held to the start of their last chunk: 29
        passes instead of 33; WER tiny.en 21.7 -> 21.6 %, base 18.0 -> 17.6), and
        bench/nonspeech.py still has no word in non-speech (the energy's last sound is not
        used: music is loud)."""
        if not self.options.vad_filter:
            return f.hold(s, size)
        return max(0, size - HOLD_MARGIN) // 2

    def _skip_if_silent(self, f: FileState, s: Stream) -> bool:
        """Moves past a window of digital silence without decoding it (see is_digital_silence)."""
        size = f.window_size(s)
        if not is_digital_silence(f.mel.audio[s.seek * HOP_LENGTH : (s.seek + size) * HOP_LENGTH]):
            return False
        s.seek += size
        s.advance()
        return True

    def _silent(self, result) -> bool:
        """OpenAI's no-speech rule: a window skipped as silence."""
        o = self.options
        silent = o.no_speech_threshold is not None and result.no_speech_prob > o.no_speech_threshold
        if silent and o.logprob_threshold is not None and result.avg_logprob > o.logprob_threshold:
            silent = False  # confident text despite a high no-speech probability
        return silent

    def _advance(self, f: FileState, s: Stream, size: int, result, decided=None) -> None:
        """OpenAI's per-window bookkeeping: skip silence, cut segments, move ``seek``.
        ``decided``: the window's ``(segments, frames to seek)`` when worked out already (words)."""
        if self._silent(result):
            s.seek += size
            # OpenAI keeps the prompt across a skipped window. When the model did write text there
            # (" and the" at a low log probability), the prompt itself is often what misleads it,
            # and keeping it skipped window after window of speech (2.5 min in one benchmark run).
            if result.text.strip():
                s.prompt_reset_since = len(s.prompt)
        else:
            split = s.packed and result.looped and (s.seek, s.clip_end) not in s.split
            if decided is None:
                decided = window_segments(self.model.tokenizer, f, s, size, result, split)
            new, advance = decided
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
        s.advance()

    def _words(self, files: dict, streams: list[Stream], sizes: list[int], results, cross) -> list:
        """Word timestamps for a decoded batch (one alignment pass over its windows), then
        OpenAI's uses of them (:func:`~whisperjax_cli.word_decisions.word_seek`). Returns per row the
        ``decided`` argument of :meth:`_advance`: None (a silent window), ``(segments, frames to
        seek)``, or False when the stream was moved to decode its window again."""
        from whisperjax_cli.timing import WindowWords, align_windows, map_times, words_from_alignment
        from whisperjax_cli.word_decisions import last_word_end, word_seek

        opts, ts_begin = self.options, self.model.tokenizer.timestamp_begin
        rows: list = [None] * len(streams)
        windows = []
        for row, (s, size, result) in enumerate(zip(streams, sizes, results)):
            if self._silent(result):
                continue
            f = files[s.file]
            split = s.packed and result.looped and (s.seek, s.clip_end) not in s.split
            new, advance = window_segments(self.model.tokenizer, f, s, size, result, split, mapped=False)
            samples = f.mel.audio[s.seek * HOP_LENGTH : (s.seek + size) * HOP_LENGTH] if opts.refine_word_timestamps else None
            windows.append(WindowWords(new, s.seek / FRAMES_PER_SECOND, size, row, f.sot_sequence, f.language, samples,
                                       last_speech_timestamp=s.last_speech))
            rows[row] = (new, advance)
        aligned = align_windows(self.model, cross, windows, opts.word_options)
        pieces = []  # of packed windows: each segment read across a break cut there, and kept to its side
        for window, alignment in zip(windows, aligned):
            stream = streams[window.row]
            if alignment is not None and stream.packed:
                cut = self._cut(files[stream.file], window.segments, window.time_offset, alignment)
                window.segments[:] = [p.segment for p in cut]  # the list rows[row] holds too
                pieces += cut
        words_from_alignment(self.model, windows, aligned, opts.word_options)
        for piece in pieces:
            piece.keep_inside()
        for row, (s, size, result) in enumerate(zip(streams, sizes, results)):
            if rows[row] is None:
                continue
            f, (new, advance) = files[s.file], rows[row]
            if not s.packed:  # a packed window is decoded once: where it ends is fixed
                tokens = result.tokens
                single = len(tokens) >= 2 and tokens[-2] < ts_begin <= tokens[-1]
                moved = word_seek(new, seek=s.seek + advance, previous_seek=s.seek, segment_size=size,
                                  single_timestamp_ending=single, content_frames=s.clip_end,
                                  last_speech_timestamp=s.last_speech,
                                  hallucination_silence_threshold=opts.hallucination_silence_threshold)
                if moved.again:
                    s.seek = moved.seek
                    s.advance()
                    rows[row] = False
                    continue
                new, advance = new[: moved.keep], max(0, moved.seek - s.seek)
            end = last_word_end(new)
            s.last_speech = end if end is not None else s.last_speech
            if f.timeline is not None:  # words and segments in the file's own times
                map_times(new, f.to_source)
                for g in new:
                    g.seek = round(f.to_source(g.seek / FRAMES_PER_SECOND) * FRAMES_PER_SECOND)
            rows[row] = (new, advance)
        return rows

    def _cut_breaks(self, files: dict, streams: list[Stream], sizes: list[int], results, audio) -> list:
        """Per row, the ``decided`` argument of :meth:`_advance`: for a packed window with a
        segment read across a break, its segments cut there (:mod:`~whisperjax_cli.seams`);
        None for the others. One alignment pass over those windows, with their audio's
        keys/values made from the rows of the encoder output ``audio`` they use."""
        from whisperjax_cli.timing import WindowWords, align_windows

        rows: list = [None] * len(streams)
        todo, windows = [], []
        for row, (s, size, result) in enumerate(zip(streams, sizes, results)):
            f = files[s.file]
            # only a window with a break inside can hold a segment across one; the others are
            # not split into segments twice
            if not s.packed or self._silent(result) or not f.timeline.holds_break(s.seek, s.seek + size):
                continue
            split = result.looped and (s.seek, s.clip_end) not in s.split
            new, advance = window_segments(self.model.tokenizer, f, s, size, result, split, mapped=False)
            if crosses_break(f.timeline, new):
                todo.append((row, advance))
                windows.append(WindowWords(new, s.seek / FRAMES_PER_SECOND, size, len(windows), f.sot_sequence,
                                           f.language))
        if not todo:
            return rows
        gather = [row for row, _ in todo]
        gather += gather[:1] * (batch_bucket(len(gather)) - len(gather))  # few shapes, few programs
        aligned = align_windows(self.model, take_rows(audio, np.asarray(gather, np.int32)), windows,
                                self.options.word_options)
        for (row, advance), window, alignment in zip(todo, windows, aligned):
            if alignment is not None:  # None: no text to cut
                f = files[streams[row].file]
                cut = self._cut(f, window.segments, window.time_offset, alignment)
                rows[row] = ([to_file(f, p.segment) for p in cut], advance)
        return rows

    def _cut(self, f: FileState, segments: list[Segment], offset: float, alignment) -> list[Piece]:
        """:func:`~whisperjax_cli.seams.cut_window` of one window of ``f``."""
        words = self.options.word_options
        return cut_window(self.model.tokenizer, f.timeline, segments, offset, *alignment, f.language,
                          words.prepend_punctuations, words.append_punctuations)

    def _split(self, f: FileState, s: Stream) -> None:
        """The rest of a window that looped, as two windows cut at a gap near its middle: tiny.en
        loops on some 20-30 s windows from their first token ("NnNnNn...") and reads either
        half of the same audio right. The halves are not split again.

        Without conditioning on previous text (the batched default: every window its own
        stream), the second half is a stream of its own, placed after the first, so both are
        decoded in the same step: a run whose last window looped ended in two steps of one row
        each, the second half waiting for the first."""
        start, end = s.seek, s.clip_end
        if start >= end:
            return
        mid = f.cuts.middle(start, end) if end - start >= 2 * SPLIT_MIN else end
        halves = [(start, mid), (mid, end)] if mid < end else [(start, end)]
        apart = len(halves) == 2 and not self.condition
        kept = halves[:1] if apart else halves
        s.clips[s.clip_index : s.clip_index + 1] = [(s.clips[s.clip_index][0], start), *kept]
        s.split.update(kept)
        if apart:
            rest = Stream(s.file, [halves[1]], list(self.initial_tokens), packed=True, split={halves[1]})
            place = next((i + 1 for i, other in enumerate(f.streams) if other is s), len(f.streams))
            f.streams.insert(place, rest)

    # ------------------------------------------------------------ the scheduler

    def run(self, sources: Iterable, sample_rate: Optional[int] = None) -> Iterator[FileEvent]:
        """Transcribes ``sources`` (paths, file objects or arrays), yielding events in file order
        per file; a file that cannot be read yields one event with ``error`` and the rest go on."""
        pending = iter(enumerate(sources))
        return self.run_feed(lambda wait: next(pending, None), sample_rate)

    def run_feed(self, take: Callable[[bool], Optional[tuple[Any, Any]]], sample_rate: Optional[int] = None
                 ) -> Iterator[FileEvent]:
        """The scheduler: transcribes inputs as ``take`` hands them over, until it returns None.

        ``take(wait)`` returns ``(key, source)`` for the next input, or None: with ``wait``
        False (rows are decoding) it must not block and None means "nothing new yet"; with
        ``wait`` True (nothing to decode) it may block until an input comes, and None then
        ends the run once every open file is done. An input joins the next step's batch as
        soon as a row is free, so a server's new request does not wait for the others to end
        (continuous batching). ``key`` is the event's ``index``.
        """
        files: dict[Any, FileState] = {}
        self._runs.append(files)
        try:
            yield from self._feed(files, take, sample_rate)
        finally:  # ended, or abandoned by its consumer: no file of this run stays cancellable
            self._runs = [run for run in self._runs if run is not files]  # by identity: {} == {}

    def _feed(self, files: dict, take: Callable, sample_rate: Optional[int]) -> Iterator[FileEvent]:
        """:meth:`run_feed`'s loop; ``files`` (key -> open file) is the caller's, to clean up."""
        ended = False
        while True:
            for key in list(self._cancelled):
                self._cancelled.discard(key)  # one that finished meanwhile is forgotten
                if key in files:
                    f = files.pop(key)
                    yield FileEvent(key, f.source, [], error=Cancelled(f"file {key!r} cancelled"), language=f.language)
            # With read-ahead, two batches' worth are open, so that the next one can be predicted.
            wanted = self.batch_size * (1 if self._ahead is None else 2)
            while not ended and sum(not s.done for f in files.values() for s in f.streams) < wanted:
                idle = not any(not s.done for f in files.values() for s in f.streams)
                nxt = take(idle)
                if nxt is None:
                    ended = idle
                    break
                key, source = nxt
                try:
                    files[key] = self.open_file(key, source, sample_rate)
                except Exception as err:  # noqa: BLE001 - per-file isolation; the CLI reports it
                    yield FileEvent(key, source, [], error=err)
            active = [s for f in files.values() for s in f.streams if not s.done]
            active = (active if self._ahead is None else self._ahead.first(active))[: self.batch_size]
            if active:
                self.step(files, active)
            for key in list(files):
                event = self._flush(files[key])
                if event is not None:
                    if event.transcript is not None:
                        del files[key]  # before the event: its consumer may ask open_files
                    yield event
            if not active and ended and not files:
                return

    def _flush(self, f: FileState) -> Optional[FileEvent]:
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


def transcribe_files(model, sources: Iterable, sample_rate: Optional[int] = None,
                     options: Optional[TranscribeOptions] = None, *, key: Optional[jax.Array] = None,
                     progress: Optional[Callable[[int, float, float], None]] = None,
                     timings: Optional[Timings] = None, **overrides) -> Iterator[FileEvent]:
    """Transcribes many inputs in one batched run, yielding :class:`FileEvent` s as they decode.

    ``options`` and/or keyword ``overrides`` (:class:`TranscribeOptions`'s fields) say how;
    ``timings`` (:class:`~whisperjax_cli.profile.Timings`) gets the time of each phase.
    """
    transcriber = Transcriber(model, options_from(options, overrides), key=key, progress=progress, timings=timings)
    return transcriber.run(sources, sample_rate)


def transcribe_segments(model, audio, sample_rate: Optional[int] = None, options: Optional[TranscribeOptions] = None,
                        **overrides) -> Iterator[Segment]:
    """A lazy generator of one input's segments, yielded as they are decoded."""
    for event in transcribe_files(model, [audio], sample_rate, options, **overrides):
        if event.error is not None:
            raise event.error
        yield from event.segments


def transcribe(model, audio, sample_rate: Optional[int] = None, options: Optional[TranscribeOptions] = None,
               **overrides) -> Transcript:
    """Transcribes one input (a path, a binary file object, or an array with its sample rate).

    Args:
      model: a :class:`~whisperjax_cli.loading.WhisperModel`, or a name to load.
      audio: a file path, a binary file object, or samples (with ``sample_rate``).
      sample_rate: the rate of an array ``audio``.
      options: a :class:`~whisperjax_cli.options.TranscribeOptions`; keyword ``overrides``
        (openai-whisper's names: ``language``, ``task``, ``temperature``, ``beam_size``,
        ``best_of``, ``patience``, ``initial_prompt``, ``condition_on_previous_text`` ... plus
        ``mode``, ``batch_size``, ``stop_loops``) replace its fields; ``key`` is the PRNG key.
    Raises:
      UsageError: a bad option value; AudioError: the input cannot be read.
    """
    if isinstance(model, str):
        from whisperjax_cli.loading import load_model

        model = load_model(model)
    for event in transcribe_files(model, [audio], sample_rate, options, **overrides):
        if event.error is not None:
            raise event.error
        if event.transcript is not None:
            return event.transcript
    raise RuntimeError("transcription ended without a result")  # unreachable: one input, one end
