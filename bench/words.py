"""Word timestamps against known word boundaries: wjx (refined and not) and faster-whisper.

The clips are built so that every word's start and end are known exactly: each word is
synthesised on its own with ``espeak-ng`` (several voices and speeds), trimmed of its leading and
trailing silence with an energy threshold, and the words are joined with pauses of varied
lengths (from none to 0.6 s) over a faint noise floor. Both implementations decode the same
16 kHz arrays with the same weights (float32, greedy, temperature 0); recognised words are
matched to the script's by their normalised text, and the start and end errors are averaged
over the matched words.

wjx's words come from ``transcribe(..., word_timestamps=True)``; "wjx refined" snaps them to
the audio (the default), "wjx" is OpenAI's alignment alone (``refine_word_timestamps=False``).

The second part times what word timestamps add to long-form transcription, on a long clip (the
script's sentences read one after another): ``transcribe`` with and without them, in both
modes, and the alignment pass alone on the same windows, one window per call.

    python bench/words.py --models tiny.en base
    python bench/words.py --models tiny.en --no-accuracy --long-audio talk.flac   # timing on any file
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
SCRIPT = (
    "the old mill stood beside a quiet river at the edge of the village",
    "every morning the miller opened the heavy doors and swept the stone floor",
    "children came to watch the wheel turn and listen to his long stories",
    "in the afternoon the farmers brought their grain on carts pulled by horses",
    "his daughter studied numbers at school and kept the accounts on weekends",
    "one spring they built a second wheel with help from the blacksmith",
    "bakers from distant towns began to send their orders by the weekly coach",
    "when the river froze that winter the whole village skated on the ice",
)
VOICES = (  # espeak-ng voice, words per minute
    ("en-us", 170), ("en-gb", 150), ("en-us+f3", 185), ("en-gb-scotland", 140),
    ("en-029", 160), ("en-us+m3", 200), ("en-gb-x-rp+f2", 155), ("en-us", 130),
)
PAUSES = (0.0, 0.0, 0.03, 0.06, 0.1, 0.15, 0.25, 0.4, 0.6)  # seconds between words, drawn per gap
NOISE_DBFS = -60.0
TRIM_DB = 40.0  # a word's audio starts and ends where its 5 ms frames rise 40 dB under its peak


def synthesize(word: str, voice: str, speed: int) -> np.ndarray:
    """One word from ``espeak-ng``, 16 kHz float32, untrimmed."""
    from scipy.signal import resample_poly

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), word], check=True)
        import soundfile as sf

        audio, rate = sf.read(path, dtype="float32")
    return resample_poly(audio, SAMPLE_RATE, rate).astype(np.float32)


def trim(audio: np.ndarray) -> np.ndarray:
    """``audio`` from its first to its last 5 ms frame within ``TRIM_DB`` of its loudest."""
    hop = SAMPLE_RATE // 200
    n = len(audio) // hop
    power = np.mean(audio[: n * hop].reshape(n, hop) ** 2, axis=1) + 1e-12
    loud = np.flatnonzero(10 * np.log10(power) > 10 * np.log10(power.max()) - TRIM_DB)
    return audio[loud[0] * hop : (loud[-1] + 1) * hop]


def build_clip(sentence: str, voice: str, speed: int, rng: np.random.Generator):
    """A clip of ``sentence`` read word by word, and each word's true ``(word, start, end)``."""
    parts, truth = [np.zeros(int(rng.uniform(0.3, 1.0) * SAMPLE_RATE), np.float32)], []
    at = len(parts[0])
    for k, word in enumerate(sentence.split()):
        if k:
            gap = np.zeros(int(rng.choice(PAUSES) * SAMPLE_RATE), np.float32)
            parts.append(gap)
            at += len(gap)
        audio = trim(synthesize(word, voice, speed))
        audio = 0.5 * audio / np.max(np.abs(audio))
        parts.append(audio)
        truth.append((word, at / SAMPLE_RATE, (at + len(audio)) / SAMPLE_RATE))
        at += len(audio)
    parts.append(np.zeros(int(0.5 * SAMPLE_RATE), np.float32))
    clip = np.concatenate(parts)
    clip += rng.normal(0, 10 ** (NOISE_DBFS / 20), len(clip)).astype(np.float32)
    return clip, truth


def cpu_model() -> str:
    """The CPU model and flags (whisperjax_cli.profile's)."""
    from whisperjax_cli.profile import cpu_description

    return cpu_description().removeprefix("CPU: ")


def normalise(word: str) -> str:
    return re.sub(r"[^a-z0-9']", "", word.lower())


def match(words: list[tuple], truth: list[tuple]) -> list[tuple]:
    """Pairs of (recognised, true) words with the same normalised text, in order."""
    a, b = [normalise(w[0]) for w in words], [t[0] for t in truth]
    blocks = difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_matching_blocks()
    return [(words[m.a + k], truth[m.b + k]) for m in blocks for k in range(m.size)]


def errors(all_words: list[list[tuple]], clips: list) -> tuple[float, float, int]:
    """Mean absolute start and end errors (ms) over the matched words, and their count."""
    starts, ends = [], []
    for words, (_, truth) in zip(all_words, clips):
        for (_, s, e), (_, ts, te) in match(words, truth):
            starts.append(abs(s - ts))
            ends.append(abs(e - te))
    return 1000 * float(np.mean(starts)), 1000 * float(np.mean(ends)), len(starts)


def decode_windows(model, audio: np.ndarray):
    """wjx's transcript of ``audio`` (without words) as windows to time: ``[(window, audio keys/values)]``,
    the keys/values as a decode hands them to the alignment pass."""
    import jax

    from whisperjax_cli import alignment, timing
    from whisperjax_cli.features import N_SAMPLES, LogMelWindows, model_window
    from whisperjax_cli.longform import transcribe
    from whisperjax_cli.model import Whisper

    transcript = transcribe(model, audio, language="en")
    mel = LogMelWindows(audio, model.n_mels, padding=N_SAMPLES)
    content = mel.n_frames - N_SAMPLES // 160
    encode = jax.jit(lambda p, m: model.module.apply({"params": p}, m, method=Whisper.encode))
    sot = tuple(model.tokenizer.sot_sequence_for("en", "transcribe")) if model.is_multilingual else (
        tuple(model.tokenizer.sot_sequence))
    by_seek = {}
    for segment in transcript.segments:
        by_seek.setdefault(segment.seek, []).append(segment)
    out = []
    for seek, segments in sorted(by_seek.items()):
        size = min(3000, content - seek)
        window = timing.WindowWords(segments, seek / 100, size, 0, sot, "en",
                                    samples=audio[seek * 160 : (seek + size) * 160])
        encoded = encode(model.params, model_window(mel, seek, size)[None])
        out.append((window, alignment.cross_kv(model.module, model.params, encoded)))
    return out


def align_one_by_one(model, windows) -> None:
    """The alignment of ``windows``, one call per window (as the sequential loop calls it)."""
    import copy

    from whisperjax_cli import timing
    from whisperjax_cli.word_decisions import last_word_end

    last = 0.0
    for window, encoded in windows:
        window = copy.deepcopy(window)
        window.last_speech_timestamp = last
        timing.add_word_timestamps(model, encoded, [window])
        last = last_word_end(window.segments) or last


def accuracy(name: str, clips: list, threads: int) -> None:
    from faster_whisper import WhisperModel as FasterWhisper

    from whisperjax_cli.loading import load_model
    from whisperjax_cli.longform import transcribe

    model = load_model(name, dtype="float32")
    fw = FasterWhisper(str(model.path), device="cpu", compute_type="float32", cpu_threads=threads)
    rows = {"faster-whisper": [], "wjx": [], "wjx refined": []}
    for audio, _ in clips:
        segments, _ = fw.transcribe(audio, word_timestamps=True, beam_size=1, temperature=0.0,
                                    condition_on_previous_text=False, language="en")
        rows["faster-whisper"].append([(w.word, w.start, w.end) for s in segments for w in s.words])
        for label, refine in (("wjx", False), ("wjx refined", True)):
            transcript = transcribe(model, audio, temperature=0.0, language="en", word_timestamps=True,
                                    refine_word_timestamps=refine)
            rows[label].append([(w.word, w.start, w.end) for s in transcript.segments for w in s.words])
    total = sum(len(t) for _, t in clips)
    for label, words in rows.items():
        start, end, n = errors(words, clips)
        print(f"{name:8} {label:15} {start:9.0f} {end:9.0f} {n:5}/{total}")


def long_clip(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """The script's sentences read whole (one ``espeak-ng`` call each, voices in turn) with short
    pauses, repeated to ``seconds``."""
    parts, total, k = [], 0, 0
    while total < seconds * SAMPLE_RATE:
        voice, speed = VOICES[k % len(VOICES)]
        speech = synthesize(SCRIPT[k % len(SCRIPT)], voice, speed)
        pause = np.zeros(int(rng.uniform(0.3, 1.0) * SAMPLE_RATE), np.float32)
        parts += [0.5 * speech / np.max(np.abs(speech)), pause]
        total += len(speech) + len(pause)
        k += 1
    clip = np.concatenate(parts)
    return clip + rng.normal(0, 10 ** (NOISE_DBFS / 20), len(clip)).astype(np.float32)


def speed(name: str, audio: np.ndarray, repeats: int) -> None:
    """What word timestamps add to long-form transcription of ``audio``, in both modes: the time of
    ``transcribe`` with them against without (the alignment pass, OpenAI's word-based seek, the
    refinement), and the alignment pass alone (one window per call). Each the best of
    ``repeats`` runs after a first that compiles, taken in turn so that other load on the
    machine hits all alike."""
    from whisperjax_cli.loading import load_model
    from whisperjax_cli.longform import transcribe

    from faster_whisper import WhisperModel as FasterWhisper

    model = load_model(name, dtype="float32")
    fw = FasterWhisper(str(model.path), device="cpu", compute_type="float32", cpu_threads=os.cpu_count())
    windows = decode_windows(model, audio)
    runs = {(mode, words): (lambda m=mode, w=words: transcribe(model, audio, language="en", mode=m, word_timestamps=w))
            for mode in ("sequential", "batched") for words in (False, True)}
    runs["alignment"] = lambda: align_one_by_one(model, windows)
    # The anchor's own cost of word timestamps, same options (greedy, OpenAI's fallback): what
    # OpenAI's word-based seek does to the trajectory shows there too.
    for words in (False, True):
        runs[("faster-whisper", words)] = lambda w=words: list(
            fw.transcribe(audio, language="en", beam_size=1, word_timestamps=w)[0])
    best = dict.fromkeys(runs, math.inf)
    for k in range(repeats + 1):
        for label, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            if k:  # the first run compiles
                best[label] = min(best[label], time.perf_counter() - t0)
    seconds = len(audio) / SAMPLE_RATE
    for mode in ("sequential", "batched", "faster-whisper"):
        plain, words = best[(mode, False)], best[(mode, True)]
        print(f"{name:8} {mode:14} {seconds:.0f} s: transcribe {plain:6.1f} s, with word timestamps {words:6.1f} s "
              f"({100 * (words - plain) / plain:+.1f} %)")
    sequential = best[("sequential", False)]
    print(f"{name:8} alignment alone, {len(windows)} windows one per call: {best['alignment']:.2f} s "
          f"= {100 * best['alignment'] / sequential:.1f} % of sequential transcription")


def main() -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # CTranslate2's threads must not spin between calls
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    parser.add_argument("--rounds", type=int, default=2, help="passes over the script (8 clips each)")
    parser.add_argument("--long-seconds", type=float, default=300.0, help="0: skip the timing part")
    parser.add_argument("--repeats", type=int, default=3, help="timing: best of this many runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--long-audio", type=Path, help="time on this file instead of the script read whole")
    parser.add_argument("--no-accuracy", action="store_true", help="only the timing part")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    clips = []
    for r in range(args.rounds):
        for k, sentence in enumerate(SCRIPT):
            voice, speed_wpm = VOICES[(k + 3 * r) % len(VOICES)]
            clips.append(build_clip(sentence, voice, speed_wpm + 10 * r, rng))
    seconds = sum(len(c) for c, _ in clips) / SAMPLE_RATE
    print(f"CPU: {cpu_model()}")
    print(f"{len(clips)} clips, {sum(len(t) for _, t in clips)} words, {seconds:.0f} s; errors in ms over the "
          "words each side recognised (matched to the script)")
    print(f"{'model':8} {'words by':15} {'start err':>9} {'end err':>9} {'matched':>11}")
    for name in [] if args.no_accuracy else args.models:
        accuracy(name, clips, args.threads)
    audio = None
    if args.long_audio is not None:
        from whisperjax_cli.audio import load_audio

        audio = load_audio(str(args.long_audio))
        print(f"timing on {args.long_audio} ({len(audio) / SAMPLE_RATE:.0f} s)")
    elif args.long_seconds > 0:
        audio = long_clip(args.long_seconds, rng)
    for name in args.models if audio is not None else []:
        speed(name, audio, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
