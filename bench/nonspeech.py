"""Speech between long non-speech stretches (music, noise, tones, applause, crackle): words placed
in non-speech, WER on the speech and speed, for wjx with VAD (sequential ``vad_filter=True`` and
batched) against faster-whisper with ``vad_filter=True``, in the same run, per model (issue #23).

    python bench/nonspeech.py --models tiny.en base --seeds 3

The audio (5.7 min at 16 kHz, 98 s of it speech, fixed seed, cached in bench/out/nonspeech.wav with its reference
in nonspeech.json) is ten espeak-ng passages of varied English (several voices and speeds; the
reference text is what espeak was given) between eleven 15-38 s stretches of synthetic
non-speech made with numpy: music (chords with harmonics, a bass line, a melody, kick, snare and
hi-hat), pink noise, applause (dense random claps of band-passed noise, swelling and fading),
vinyl-like crackle, a held tone, and music with applause over it. Each stretch is set to an RMS
within 0-10 dB of the speech's (active-speech RMS), so the non-speech is as loud as the speech.
One passage has music under it at -15 dB (it counts as speech).

Systems, each model, same run:

* ``wjx-seq-vad``: ``transcribe_files(model, [audio], vad_filter=True, key=PRNGKey(seed))``,
  OpenAI's loop over Silero VAD's speech (default fallback ladder, greedy), float32.
* ``wjx-batched``: ``mode="batched"`` (VAD on by default, batch 8, temperature 0), in the
  dtype ``wjx transcribe --mode batched`` picks on this CPU (``mixed`` with bfloat16 dot
  instructions, float32 otherwise); ``--batched-f32`` adds its float32 row.
* ``fw-vad``: faster-whisper ``WhisperModel.transcribe(audio, vad_filter=True, beam_size=1)``
  (greedy as wjx's default; faster-whisper's own default is beam 5).
* ``fw-batched``: ``BatchedInferencePipeline(model).transcribe(audio, batch_size=8)`` with its
  defaults (its VAD; beam 5; first temperature alone), and ``fw-batched-greedy`` the same with
  ``beam_size=1`` (wjx-batched's search), the speed comparison nearest equal work (its
  pipeline still decodes without timestamp tokens, wjx's with them).
* Context: ``fw-novad`` and ``wjx-seq-novad``, the sequential loops over the whole file
  (``--context-seeds`` passes, 1 by default, to keep the run under ~40 min on 2 cores).

Fallback sampling is random on both sides, so every row runs ``--seeds`` passes, one seed each
(``jax.random.PRNGKey(seed)``; ``ctranslate2.set_random_seed(seed)``, which does not make
CTranslate2's sampling repeat, OpenNMT/CTranslate2#1757), and reports means. The passes of all
rows alternate (per seed one pass of each row in turn), so every ratio is over the same minutes
of a machine whose speed drifts. wjx compiles its programs first (sequential rows: every prompt
bucket at temperature 0 and > 0, a 90 s pass and the VAD over the whole file; batched rows, which
decode at temperature 0 alone: one untimed pass); faster-whisper warms up on a minute.

OMP_WAIT_POLICY is PASSIVE unless set (see the comment at the top of the code).

Metrics: WER (%) of the whole hypothesis against the concatenated reference under Whisper's
English normalizer (whisper-normalizer) and jiwer; *words in non-speech*: the words (whitespace
tokens with a letter or digit) of the segments that lie mostly (> 50 % of their duration, or
their instant if they have none) outside the speech passages widened by 0.5 s each side, the same
rule for both implementations (``norm words`` counts them after the normalizer, which drops
bracketed annotations such as "(music)"; ``ins`` counts those of them that the WER alignment
calls insertions, i.e. text that reads no speech at all). Most flagged words are real speech
whose segment start was mapped back to the end of the previous speech chunk: a segment that
begins on a seam of the VAD-packed audio then spans the whole non-speech gap, on either side;
``ins`` tells such segments from hallucinations over music or noise. Seconds of the transcribe
call (VAD, feature extraction and decoding; the audio is already in memory) and RTFx = audio
seconds / seconds.

Bar (issue #23): words in non-speech of wjx-seq-vad <= fw-vad's; WER(wjx-seq-vad) <=
WER(fw-vad) + 1; WER(wjx-batched) <= WER(wjx-seq-vad) + 2; and the speed ratios of wjx-batched
against fw-vad (sequential) and fw-batched, VAD included, against ``--speed-bar``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# GNU OpenMP (CTranslate2's threads) spins while it waits: on a machine that other work shares,
# its threads then spin against each other's time slices (faster-whisper 6-10x slower here with
# 2 threads on 2 busy cores). Passive waiting costs little on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"
SR = 16000
AUDIO_VERSION = 3  # bump when the audio recipe changes (the cache is keyed on it)
WIDEN = 0.5  # seconds each side of a passage that still count as speech
CONTEXT = ("fw-novad", "wjx-seq-novad")  # rows that run --context-seeds passes only

PASSAGES = [  # (voice, words per minute, text)
    ("en-us", 165, "The old lighthouse stood at the edge of the cliff for more than a century. Every night its "
                   "keeper climbed the narrow stairs and lit the lamp, so that ships could find their way home "
                   "through the fog."),
    ("en-gb", 155, "Fresh bread is made from flour, water, salt and yeast. The dough is kneaded until it is smooth, "
                   "left to rise in a warm place, and then baked in a hot oven until the crust turns golden brown."),
    ("en-us+f3", 170, "Our meeting on Thursday has been moved to the small room on the second floor. Please bring "
                      "your notes from last week, and let me know if you cannot make it."),
    ("en-gb-x-rp", 150, "Rivers carry water from the mountains to the sea. Along the way they carve deep valleys, "
                        "feed wide wetlands full of birds, and give towns a reason to grow on their banks."),
    ("en-us", 175, "The train to the city leaves every twenty minutes during the day. At night the service is "
                   "less frequent, so check the timetable before you set out."),
    ("en-gb-scotland", 150, "My grandmother kept a garden full of roses, beans and potatoes. She said that good soil "
                            "and patience matter more than any clever trick you read about in a book."),
    ("en-us+m3", 160, "Scientists measured the temperature of the lake at different depths. Near the surface the "
                      "water was warm, but a few meters down it was cold enough to make the divers shiver."),
    ("en-gb+f2", 165, "The museum opens at nine in the morning and closes at five. Children under twelve enter for "
                      "free, and guided tours start from the main hall every hour."),
    ("en-us", 150, "When the storm finally passed, the neighbours came out to clear the fallen branches from the "
                   "road. By the evening the street was quiet again, and the sky was full of stars."),
    ("en-gb", 170, "Learning a new language takes time. Listen to it every day, speak without fear of mistakes, "
                   "and you will be surprised how quickly the words begin to feel familiar."),
]
MUSIC_UNDER = 6  # this passage has music under it at -15 dB
# The non-speech stretches, in order (one before each passage and one after the last):
# (kind, seconds, level in dB against the speech's active RMS).
STRETCHES = [
    ("music", 20, 0), ("pink", 18, -6), ("applause", 22, -3), ("tone", 16, -10), ("music", 30, 0),
    ("crackle", 17, -6), ("applause", 25, -3), ("music", 38, -2), ("pink", 15, -4),
    ("music+applause", 21, 0), ("tone", 19, -8),
]


# ---------------------------------------------------------------- the audio

def _fade(x: np.ndarray, seconds: float = 0.05) -> np.ndarray:
    n = min(int(seconds * SR), len(x) // 2)
    if n:
        ramp = np.linspace(0, 1, n, dtype=np.float32)
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def _note(freq: float, n: int, harmonics=(1.0, 0.5, 0.33, 0.25, 0.15), attack=0.01, decay=3.0) -> np.ndarray:
    """A note with harmonics and a struck envelope (quick attack, exponential decay)."""
    t = np.arange(n) / SR
    wave = sum(a * np.sin(2 * np.pi * freq * (k + 1) * t) for k, a in enumerate(harmonics) if freq * (k + 1) < 7500)
    env = np.minimum(t / attack, 1.0) * np.exp(-decay * t)
    return (wave * env).astype(np.float32)


def _noise_burst(rng, n: int, decay: float, lowcut: float = 0.0, highcut: float = 8000.0) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / SR)
    spectrum[(freqs < lowcut) | (freqs > highcut)] = 0
    burst = np.fft.irfft(spectrum, n)
    return (burst * np.exp(-decay * np.arange(n) / SR)).astype(np.float32)


def music(rng, n: int) -> np.ndarray:
    """Chords (with harmonics) on every bar, a bass line, a melody in eighths and quarters, and
    a beat: kick on 1 and 3, snare on 2 and 4, hi-hat on every eighth."""
    bpm = rng.uniform(95, 135)
    beat = int(SR * 60 / bpm)
    root = 220.0 * 2 ** (rng.integers(-5, 6) / 12)
    major = [0, 2, 4, 5, 7, 9, 11]
    progression = [[0, 4, 7], [7, 11, 14], [9, 12, 16], [5, 9, 12]]  # I V vi IV
    out = np.zeros(n + 8 * beat, np.float32)
    bar = 4 * beat
    for b, start in enumerate(range(0, n, bar)):
        chord = progression[b % 4]
        for semis in chord:
            out[start:start + bar] += 0.18 * _note(root * 2 ** (semis / 12), bar, decay=1.2)
        out[start:start + bar] += 0.35 * _note(root / 2 * 2 ** (chord[0] / 12), bar, harmonics=(1.0, 0.3), decay=1.5)
        for k in range(4):  # drums
            at = start + k * beat
            if k % 2 == 0:
                t = np.arange(beat // 2) / SR
                out[at:at + beat // 2] += 0.9 * np.sin(2 * np.pi * (50 + 70 * np.exp(-30 * t)) * t) * np.exp(-12 * t)
            else:
                out[at:at + beat // 2] += 0.35 * _noise_burst(rng, beat // 2, 25, 200, 6000)
            for h in (at, at + beat // 2):
                out[h:h + beat // 4] += 0.12 * _noise_burst(rng, beat // 4, 60, 5000)
        at = start  # melody over the bar
        while at < start + bar:
            length = beat // 2 if rng.random() < 0.6 else beat
            degree = rng.integers(0, 10)
            freq = 2 * root * 2 ** ((major[degree % 7] + 12 * (degree // 7)) / 12)
            out[at:at + length] += 0.3 * _note(freq, length, harmonics=(1.0, 0.4, 0.2), attack=0.02, decay=4.0)
            at += length
    return out[:n]


def pink(rng, n: int) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum /= np.sqrt(np.maximum(np.arange(spectrum.size), 1))
    return np.fft.irfft(spectrum, n).astype(np.float32)


def applause(rng, n: int) -> np.ndarray:
    """Many people clapping: band-passed noise claps at random (40-120 per second), louder in the
    middle, and some crackle."""
    out = np.zeros(n + SR, np.float32)
    t = np.arange(n) / n
    density = 40 + 80 * np.sin(np.pi * t)  # swells and fades
    claps = rng.random(n) < density / SR
    clap_len = int(0.015 * SR)
    for at in np.flatnonzero(claps):
        out[at:at + clap_len] += rng.uniform(0.3, 1.0) * _noise_burst(rng, clap_len, 250, rng.uniform(600, 1200), 5000)
    return out[:n] + 0.3 * crackle(rng, n)


def crackle(rng, n: int) -> np.ndarray:
    """Vinyl-like crackle: random clicks of random size over faint hiss."""
    out = (rng.standard_normal(n) * 0.02).astype(np.float32)
    clicks = rng.integers(0, n - 40, size=n // 400)
    for at in clicks:
        width = rng.integers(2, 30)
        out[at:at + width] += rng.uniform(-1, 1) * np.exp(-np.arange(width) / max(1, width / 4))
    return out


def tone(rng, n: int) -> np.ndarray:
    """A held tone (a little vibrato, two weak harmonics)."""
    t = np.arange(n) / SR
    freq = rng.choice([440.0, 523.25, 1000.0, 261.63])
    phase = 2 * np.pi * freq * t + 0.3 * np.sin(2 * np.pi * 5 * t)
    return (np.sin(phase) + 0.1 * np.sin(2 * phase) + 0.05 * np.sin(3 * phase)).astype(np.float32)


def make_stretch(rng, kind: str, n: int) -> np.ndarray:
    if kind == "music+applause":
        m, a = music(rng, n), applause(rng, n)
        return m / _rms(m) + 0.7 * a / _rms(a)
    return {"music": music, "pink": pink, "applause": applause, "crackle": crackle, "tone": tone}[kind](rng, n)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) + 1e-12


def active_rms(x: np.ndarray) -> float:
    """RMS over the 20 ms frames within 40 dB of the loudest (speech without its pauses)."""
    frames = x[: len(x) // 320 * 320].reshape(-1, 320)
    energy = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
    return float(np.sqrt(np.mean(np.square(energy[energy > energy.max() * 0.01]))))


def espeak(voice: str, speed: int, text: str, tmp: Path, i: int) -> np.ndarray:
    from whisperjax_cli.audio import load_audio

    wav = tmp / f"{i}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True)
    x = load_audio(wav)  # 16 kHz mono float32
    loud = np.flatnonzero(np.abs(x) > 0.01 * np.abs(x).max())
    lo, hi = max(0, loud[0] - int(0.05 * SR)), min(len(x), loud[-1] + int(0.05 * SR))
    return x[lo:hi].copy()  # espeak's own leading and trailing silence trimmed


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps([AUDIO_VERSION, PASSAGES, MUSIC_UNDER, STRETCHES]).encode()).hexdigest()[:16]


def build_audio(seed: int = 0) -> tuple[np.ndarray, dict]:
    """The audio and its description: reference text, passages (start, end in seconds), stretches."""
    wav, meta_path = OUT / "nonspeech.wav", OUT / "nonspeech.json"
    import soundfile as sf

    if wav.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("recipe") == recipe_hash() and meta.get("seed") == seed:
            audio, sr = sf.read(wav, dtype="float32")
            assert sr == SR
            return audio, meta
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        speech = [espeak(v, s, text, Path(tmp), i) for i, (v, s, text) in enumerate(PASSAGES)]
    level = float(np.mean([active_rms(x) for x in speech]))  # the speech's active RMS
    parts, passages, stretches, at = [], [], [], 0
    for i, (kind, seconds, db) in enumerate(STRETCHES):
        x = make_stretch(rng, kind, int(seconds * SR))
        x = _fade(x / _rms(x) * level * 10 ** (db / 20))
        stretches.append(dict(kind=kind, start=at / SR, end=(at + len(x)) / SR, db=db))
        parts.append(x)
        at += len(x)
        if i < len(speech):
            s = speech[i] / active_rms(speech[i]) * level  # every passage at the same level
            if i == MUSIC_UNDER:
                m = music(rng, len(s))
                s = s + _fade(m / _rms(m) * _rms(s) * 10 ** (-15 / 20))
            passages.append(dict(start=at / SR, end=(at + len(s)) / SR, voice=PASSAGES[i][0], speed=PASSAGES[i][1],
                                 text=PASSAGES[i][2], music_under=i == MUSIC_UNDER))
            parts.append(s.astype(np.float32))
            at += len(s)
    audio = np.concatenate(parts).astype(np.float32)
    peak = float(np.abs(audio).max())
    if peak > 0.95:  # one gain for the whole file: the relative levels stay
        audio *= 0.95 / peak
    meta = dict(recipe=recipe_hash(), seed=seed, duration=len(audio) / SR, passages=passages, stretches=stretches,
                reference=" ".join(p[2] for p in PASSAGES),
                speech_dbfs=20 * np.log10(level * min(1.0, 0.95 / peak)))
    OUT.mkdir(parents=True, exist_ok=True)
    sf.write(wav, audio, SR, subtype="FLOAT")
    meta_path.write_text(json.dumps(meta, indent=1))
    return audio, meta


# ---------------------------------------------------------------- metrics

_NORM = None


def normalize(text: str) -> str:
    global _NORM
    if _NORM is None:
        from whisper_normalizer.english import EnglishTextNormalizer

        _NORM = EnglishTextNormalizer()
    return _NORM(text)


def wer(reference: str, hypothesis: str) -> float:
    import jiwer

    ref, hyp = normalize(reference), normalize(hypothesis)
    if not hyp.strip():
        return 100.0
    return 100 * jiwer.wer(ref, hyp)


def words(text: str) -> int:
    return sum(any(c.isalnum() for c in w) for w in text.split())


def outside_fraction(start: float, end: float, spans: list[tuple[float, float]]) -> float:
    """The share of [start, end] outside ``spans`` (an instant: 0 or 1)."""
    if end <= start:
        return 0.0 if any(a <= start <= b for a, b in spans) else 1.0
    inside = sum(max(0.0, min(end, b) - max(start, a)) for a, b in spans)
    return 1.0 - inside / (end - start)


def in_nonspeech(segments: list[tuple[float, float, str]], spans) -> list[int]:
    """Indices of the segments with text that lie mostly outside ``spans``."""
    return [i for i, (s, e, t) in enumerate(segments) if t.strip() and outside_fraction(s, e, spans) > 0.5]


def inserted_words(reference: str, segments: list[tuple[float, float, str]]) -> list[int]:
    """Per segment, how many of its (normalized) words the WER alignment against the reference
    counts as insertions: words that are not a reading of the speech at all. A segment that VAD's
    time mapping stretched over a gap (it starts where the previous speech chunk ended) has none."""
    import jiwer

    owner = [i for i, (_, _, t) in enumerate(segments) for _ in normalize(t).split()]
    counts = [0] * len(segments)
    if not owner:
        return counts
    hyp = " ".join(w for _, _, t in segments for w in normalize(t).split())
    for chunk in jiwer.process_words(normalize(reference), hyp).alignments[0]:
        if chunk.type == "insert":
            for j in range(chunk.hyp_start_idx, chunk.hyp_end_idx):
                counts[owner[j]] += 1
    return counts


# ---------------------------------------------------------------- the systems

def compile_sequential(model, **kwargs) -> None:
    """Compiles (or loads from the on-disk cache) the programs a sequential run with ``kwargs``
    may meet: batch 1, every prompt bucket, greedy at 0 and best-of sampling above 0 (a seed's
    fallback trajectory otherwise meets programs the warm-up pass did not, inside a timed pass)."""
    import jax

    from whisperjax_cli.features import N_FRAMES
    from whisperjax_cli.longform import Transcriber
    from whisperjax_cli.options import TranscribeOptions
    from whisperjax_cli.window_decoder import PROMPT_BUCKETS, LazyKey, build_prompt

    transcriber = Transcriber(model, TranscribeOptions(**kwargs))
    decoder, tok = transcriber.decoder, model.tokenizer
    temperatures = (0.0, 0.2) if len(transcriber.options.temperatures) > 1 else transcriber.options.temperatures
    audio = decoder.encode(np.zeros((1, N_FRAMES, model.n_mels), np.float32))
    sot = tuple(tok.sot_sequence_for("en", "transcribe")) if tok.multilingual else tuple(tok.sot_sequence)
    for length in PROMPT_BUCKETS:
        previous = [tok.encode(" the")[0]] * max(0, length - 1 - len(sot))
        prompt, tail = build_prompt(tok, sot, previous, False, model.dims.n_text_ctx)
        for temperature in temperatures:
            decoder._decode_rows(audio, [0], [prompt], tail, temperature, LazyKey(jax.random.PRNGKey(0)))


class Wjx:
    def __init__(self, model, **kwargs):
        self.model, self.kwargs = model, kwargs

    def prepare(self, audio) -> None:
        from whisperjax_cli.options import TranscribeOptions
        from whisperjax_cli.vad import speech_timestamps

        options = TranscribeOptions(**self.kwargs)
        if options.mode == "batched":  # temperature 0 alone: a whole pass meets every program it will
            self.run(audio, 10_000)
            return
        compile_sequential(self.model, **{k: v for k, v in self.kwargs.items() if k != "vad_filter"})
        self.run(audio[: 90 * SR], 10_000)  # the encoder, log-mel and the rest
        if options.vad_filter:  # the VAD's block shapes of the whole file
            speech_timestamps(audio, options.vad_parameters)

    def run(self, audio, seed: int):
        import jax

        from whisperjax_cli.longform import transcribe_files
        from whisperjax_cli.options import TranscribeOptions

        options = TranscribeOptions(**self.kwargs)
        t0 = time.perf_counter()
        transcript = None
        for event in transcribe_files(self.model, [audio], options=options, key=jax.random.PRNGKey(seed)):
            if event.error is not None:
                raise event.error
            if event.transcript is not None:
                transcript = event.transcript
        seconds = time.perf_counter() - t0
        return ([(g.start, g.end, g.text) for g in transcript.segments], transcript.language, seconds)


class FasterWhisper:
    def __init__(self, fw, batched: bool = False, **kwargs):
        self.fw, self.batched, self.kwargs = fw, batched, kwargs
        if batched:
            from faster_whisper import BatchedInferencePipeline

            self.pipeline = BatchedInferencePipeline(fw)

    def prepare(self, audio) -> None:
        self.run(audio[: 60 * SR], 0)

    def run(self, audio, seed: int):
        import ctranslate2

        ctranslate2.set_random_seed(seed)
        t0 = time.perf_counter()
        if self.batched:
            segments, info = self.pipeline.transcribe(audio, **self.kwargs)
        else:
            segments, info = self.fw.transcribe(audio, **self.kwargs)
        segments = [(s.start, s.end, s.text) for s in segments]
        return segments, info.language, time.perf_counter() - t0


# ---------------------------------------------------------------- the run

def cpu_description() -> str:
    """The CPU model and flags (whisperjax_cli.profile's), with the load average."""
    from whisperjax_cli.profile import cpu_description as describe

    try:
        load = " load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = ""
    return f"{describe()};{load}"


def run_model(name: str, args, audio, meta) -> dict:
    import jax
    from faster_whisper import WhisperModel

    from whisperjax_cli.loading import load_model, throughput_dtype

    duration = len(audio) / SR
    spans = [(p["start"] - WIDEN, p["end"] + WIDEN) for p in meta["passages"]]
    model = load_model(name, dtype="float32")
    batched_dtype = throughput_dtype("cpu") or "float32"
    batched_model = load_model(name, dtype=batched_dtype) if batched_dtype != "float32" else model
    fw = WhisperModel(str(model.path), device="cpu", compute_type="float32", cpu_threads=args.threads)
    lang = {} if args.language is None else dict(language=args.language)
    systems = {
        "fw-vad": FasterWhisper(fw, vad_filter=True, beam_size=1, **lang),
        "wjx-seq-vad": Wjx(model, vad_filter=True, **lang),
        "wjx-batched": Wjx(batched_model, mode="batched", batch_size=args.batch_size, **lang),
        "wjx-batched-f32": Wjx(model, mode="batched", batch_size=args.batch_size, **lang),
        "fw-batched": FasterWhisper(fw, batched=True, batch_size=args.batch_size, **lang),
        "fw-batched-greedy": FasterWhisper(fw, batched=True, batch_size=args.batch_size, beam_size=1, **lang),
        "fw-novad": FasterWhisper(fw, vad_filter=False, beam_size=1, **lang),
        "wjx-seq-novad": Wjx(model, vad_filter=False, **lang),
    }
    if not args.batched_f32 or batched_dtype == "float32":
        del systems["wjx-batched-f32"]
    for skip in args.skip:
        systems.pop(skip, None)
    print(f"\n== {name}: wjx-batched in {batched_dtype}, other wjx rows float32; faster-whisper float32, "
          f"{args.threads} threads", flush=True)
    t0 = time.perf_counter()
    for system in systems.values():
        system.prepare(audio)
    print(f"   warm-up and compilation: {time.perf_counter() - t0:.0f} s", flush=True)
    runs = {k: [] for k in systems}
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    for seed in seeds:
        for key, system in systems.items():
            if key in CONTEXT and seed >= args.first_seed + args.context_seeds:
                continue
            segments, language, seconds = system.run(audio, seed)
            text = "".join(t for _, _, t in segments)
            flagged = in_nonspeech(segments, spans)
            inserted = inserted_words(meta["reference"], segments)
            runs[key].append(dict(seed=seed, seconds=seconds, language=language, wer=wer(meta["reference"], text),
                                  nonspeech_words=sum(words(segments[i][2]) for i in flagged),
                                  nonspeech_norm_words=sum(len(normalize(segments[i][2]).split()) for i in flagged),
                                  nonspeech_inserted=sum(inserted[i] for i in flagged), inserted=sum(inserted),
                                  nonspeech=[(*segments[i], inserted[i]) for i in flagged], text=text,
                                  segments=segments))
            r = runs[key][-1]
            print(f"   seed {seed} {key:18} WER {r['wer']:6.2f}  non-speech words {r['nonspeech_words']:3d} "
                  f"(inserted {r['nonspeech_inserted']:3d})  {seconds:6.1f} s  [{language}]", flush=True)
    jax.clear_caches()  # the next model's programs would otherwise sit next to these (XLA maps each)
    rows = {}
    for key, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        rows[key] = dict(wer=float(np.mean([r["wer"] for r in rs])), wers=[r["wer"] for r in rs],
                         nonspeech_words=float(np.mean([r["nonspeech_words"] for r in rs])),
                         all_nonspeech_words=[r["nonspeech_words"] for r in rs],
                         nonspeech_norm_words=float(np.mean([r["nonspeech_norm_words"] for r in rs])),
                         nonspeech_inserted=float(np.mean([r["nonspeech_inserted"] for r in rs])),
                         inserted=float(np.mean([r["inserted"] for r in rs])),
                         seconds=float(np.mean(secs)), all_seconds=secs, rtfx=duration / float(np.mean(secs)),
                         languages=sorted({str(r["language"]) for r in rs}), passes=rs)
    return rows


def report(name: str, rows: dict, args) -> list[str]:
    print(f"\n{name}: {args.seeds} passes per row, {min(args.seeds, args.context_seeds)} for {', '.join(CONTEXT)} "
          f"(means; [min, max])")
    print(f"{'system':18} {'WER %':>22} {'non-speech words':>20} {'norm':>5} {'ins':>5} {'ins all':>7} "
          f"{'seconds':>20} {'RTFx':>6}  language")
    for key, r in rows.items():
        w, nw, s = r["wers"], r["all_nonspeech_words"], r["all_seconds"]
        print(f"{key:18} {r['wer']:7.2f} [{min(w):6.2f}, {max(w):6.2f}] {r['nonspeech_words']:7.1f} [{min(nw):4d}, "
              f"{max(nw):4d}] {r['nonspeech_norm_words']:6.1f} {r['nonspeech_inserted']:5.1f} {r['inserted']:7.1f} "
              f"{r['seconds']:7.1f} [{min(s):5.1f}, {max(s):5.1f}] {r['rtfx']:6.1f}  {','.join(r['languages'])}")
    print("(non-speech words: words of the segments lying mostly outside the passages widened by 0.5 s; norm: the same "
          "after the normalizer; ins: those of them the WER alignment counts as insertions; ins all: insertions anywhere)")
    verdicts = []

    def check(label, ok, detail, bar=True):
        mark = ("PASS" if ok else "FAIL") if bar else ("info: yes" if ok else "info: no")
        line = f"  [{mark}] {name}: {label}: {detail}"
        verdicts.append(line)
        print(line)

    print("bar:")
    seq, fwv, bat = rows.get("wjx-seq-vad"), rows.get("fw-vad"), rows.get("wjx-batched")
    if seq and fwv:
        check("words in non-speech, wjx-seq-vad <= fw-vad", seq["nonspeech_words"] <= fwv["nonspeech_words"],
              f"{seq['nonspeech_words']:.1f} vs {fwv['nonspeech_words']:.1f} (normalized {seq['nonspeech_norm_words']:.1f} "
              f"vs {fwv['nonspeech_norm_words']:.1f}; inserted {seq['nonspeech_inserted']:.1f} vs "
              f"{fwv['nonspeech_inserted']:.1f})")
        check("WER(wjx-seq-vad) <= WER(fw-vad) + 1", seq["wer"] <= fwv["wer"] + 1,
              f"{seq['wer']:.2f} vs {fwv['wer']:.2f} + 1")
    if seq and bat:
        check("WER(wjx-batched) <= WER(wjx-seq-vad) + 2", bat["wer"] <= seq["wer"] + 2,
              f"{bat['wer']:.2f} vs {seq['wer']:.2f} + 2")
        for other in ("fw-vad", "fw-batched"):
            if other in rows:
                o = rows[other]
                check(f"words in non-speech, wjx-batched <= {other}", bat["nonspeech_words"] <= o["nonspeech_words"],
                      f"{bat['nonspeech_words']:.1f} vs {o['nonspeech_words']:.1f} (inserted "
                      f"{bat['nonspeech_inserted']:.1f} vs {o['nonspeech_inserted']:.1f})", bar=False)
    for other in ("fw-vad", "fw-batched", "fw-batched-greedy"):
        if bat and other in rows:
            ratio = rows[other]["seconds"] / bat["seconds"]
            check(f"speed wjx-batched vs {other} (VAD in the timing) >= {args.speed_bar:g}x", ratio >= args.speed_bar,
                  f"{ratio:.2f}x ({bat['seconds']:.1f} s vs {rows[other]['seconds']:.1f} s)")
    print("segments placed in non-speech (text, times; passes that wrote it):")
    for key, r in rows.items():
        seen: dict[str, list] = {}
        for p in r["passes"]:
            for s, e, t, ins in p["nonspeech"]:
                seen.setdefault(t.strip(), []).append((s, e, ins, p["seed"]))
        if seen:
            print(f"  {key}:")
            for text, where in seen.items():
                s, e, ins, _ = where[0]
                print(f"    {s:7.2f}-{e:7.2f}  {text!r}  ({ins} inserted; seeds {sorted({w[3] for w in where})})")
    return verdicts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    parser.add_argument("--seeds", type=int, default=3, help="passes per row, one sampling seed each")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--context-seeds", type=int, default=1,
                        help="passes of the context rows without VAD (fw-novad, wjx-seq-novad)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="faster-whisper's cpu_threads")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--language", default=None, help="both sides' language (default: detected)")
    parser.add_argument("--batched-f32", action="store_true", help="also wjx-batched in float32 (bfloat16 CPUs)")
    parser.add_argument("--skip", nargs="*", default=[], help="rows to leave out, e.g. fw-novad wjx-seq-novad")
    parser.add_argument("--speed-bar", type=float, default=1.0,
                        help="wjx-batched must be this many times as fast as the faster-whisper rows")
    parser.add_argument("--seconds", type=float, default=None, help="only the first SECONDS of the audio (smoke runs)")
    args = parser.parse_args()

    from whisperjax_cli.runtime import configure

    configure(device="cpu")  # the on-disk compile cache, as the CLI
    audio, meta = build_audio()
    if args.seconds:
        audio = audio[: int(args.seconds * SR)]
        meta = dict(meta, passages=[p for p in meta["passages"] if p["end"] <= args.seconds])
        meta["reference"] = " ".join(p["text"] for p in meta["passages"])
    duration = len(audio) / SR
    speech = sum(p["end"] - p["start"] for p in meta["passages"])
    print(cpu_description())
    print(f"audio: {duration / 60:.2f} min, {len(meta['passages'])} passages ({speech:.0f} s of speech, active level "
          f"{meta['speech_dbfs']:.1f} dBFS), non-speech: " + ", ".join(
              f"{s['kind']} {s['end'] - s['start']:.0f} s" for s in meta["stretches"] if s["start"] < duration))
    results, verdicts = {}, []
    t0 = time.perf_counter()
    for name in args.models:
        rows = results[name] = run_model(name, args, audio, meta)
        verdicts += report(name, rows, args)
    print(f"\n{cpu_description()}\nall bars ({time.perf_counter() - t0:.0f} s in all):")
    print("\n".join(verdicts))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "nonspeech-results.json").write_text(json.dumps(dict(cpu=cpu_description(), args=vars(args), duration=duration,
                                                                results=results), indent=1))
    return 1 if any("[FAIL]" in v for v in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
