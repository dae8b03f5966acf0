"""Long-form accuracy and speed: wjx (sequential greedy, sequential beam 5, batched) against
faster-whisper (sequential greedy and beam 5) on the same audio, weights and settings.
``wjx-batched`` runs as ``wjx transcribe --mode batched`` does on this machine: in mixed
precision (``dtype="mixed"``: the encoder's products and the output projection in bfloat16,
float32 accumulation) on a CPU with bfloat16 dot instructions; ``wjx-batched-f32`` is the same
in float32 (not run on other CPUs, where wjx-batched is float32 already). Every other row is
float32. ``--first-seed`` starts the seeds elsewhere, so that runs add passes rather than repeat them.
Batched mode decodes as faster-whisper's batched pipeline does by default (each window once, at
temperature 0 alone, without the previous text; speech only) but greedily, where that pipeline's
default is beam 5: ``--whole-process`` runs it both ways. The issue's bar also compares it with
faster-whisper's *sequential* greedy row, which it runs alongside.

The audio is espeak-ng reading the Apache License 2.0 (Debian's /usr/share/common-licenses),
paragraph by paragraph with 1.2 s pauses, and 60 s of faint noise in the middle: about ten
minutes of English that no test tunes to. WER is computed under Whisper's English text
normalizer (the ``whisper-normalizer`` package) with jiwer. RTFx = audio seconds / mean wall seconds.

Fallback sampling (temperature > 0) is random on both sides, and one window's draw changes the
prompt of every later one, so a single run of either side moves by several WER points and tens of
percent in time. Each row is therefore the mean of ``--seeds`` timed passes, one sampling seed each
(``jax.random.PRNGKey(seed)`` here, so our rows repeat exactly from run to run). faster-whisper's
passes call ``ctranslate2.set_random_seed(seed)``, but that does not make CTranslate2's sampling
repeatable (OpenNMT/CTranslate2#1757): its rows move between runs of this same command (mean WER of
its greedy row 22.8-35.6 % over five runs), so compare means over many passes rather than one
run's; the last lines give each wjx row's difference from all passes of its faster-whisper row with
a 90 % bootstrap interval, the room the draws leave. The machine's own speed also drifts (20-25 %
between hours here), so each wjx row runs alternately with the faster-whisper row it is compared
with (greedy rows and batched with fw-greedy, beam with fw-beam5): per seed one faster-whisper
pass, then one wjx pass, and the ratio printed next to the row is over those passes alone; the fw
rows at the end pool every pass they made. Before timing, wjx runs one untimed pass over the whole
audio, so the prompt and batch buckets it compiles are not counted (every decode program it may
meet is compiled first, or loaded from the on-disk cache); faster-whisper warms up on the first
minute.

With ``--memory-hours H [H ...]`` it also synthesises H-hour inputs (the speech at its start and
its end, dither under -80 dBFS between, which is skipped undecoded, so a run takes a minute, not
an hour) and reports the peak RSS of a subprocess that transcribes each, next to the size of its
16 kHz audio and the RSS before transcription (model and audio loaded). The log-mel is computed
per window, so what transcription adds should not depend on the hours; between two lengths the
peak should grow by the extra audio alone.

    python bench/longform.py --model tiny.en --threads 2 --memory-hours 1 2

With ``--whole-process`` it times what a user waits for instead: fresh processes, spawn to exit,
``wjx transcribe FILE -o -`` (sequential greedy, beam 5, batched greedy and beam 5) against a
faster-whisper script (``WhisperModel.transcribe``, and ``BatchedInferencePipeline`` at the same
batch size: ``fw-batched`` with its default beam 5, ``fw-batched-greedy`` at beam 1), in turns,
start-up, compiles (from the filled compile cache) and all; ``--profile`` adds where each wjx
row's time goes (``wjx transcribe --profile``), the CPU is printed with its AVX-512/AMX flags:

    python bench/longform.py --whole-process --profile --model tiny.en --seeds 2

``--audio FILE [--reference TEXT_FILE]`` runs the same comparison on audio of one's own instead
of the synthesised reading (held-out speech: the figures that count are on audio no one tuned
for); without a reference only the times are compared:

    python bench/longform.py --whole-process --audio talk.flac --reference talk.txt --seeds 3

With ``--no-fallback`` both sides decode at temperature 0 alone: nothing is sampled, so both
sides repeat from pass to pass, their WER differs only where their decoding does (not by a draw),
and the speed ratio is over the same work. The default settings (fallback on) are what the
bars are judged at; this shows what their noise hides.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
LICENSE = Path("/usr/share/common-licenses/Apache-2.0")
SR = 16000


def paragraphs(text: str) -> list[str]:
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return [p for p in paras if re.search(r"[A-Za-z]", p)]


def synthesise(out_wav: Path) -> tuple[np.ndarray, str]:
    """espeak-ng speech of every paragraph, 1.2 s pauses, 60 s of faint noise in the middle."""
    from whisperjax_cli.audio import load_audio

    paras = paragraphs(LICENSE.read_text())
    pieces = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, para in enumerate(paras):
            wav = Path(tmp) / f"{i}.wav"
            subprocess.run(["espeak-ng", "-v", "en-us", "-s", "165", "-w", str(wav), para], check=True)
            pieces.append(load_audio(wav))
    pause = np.zeros(int(1.2 * SR), np.float32)
    noise = (np.random.default_rng(0).standard_normal(60 * SR) * 3e-4).astype(np.float32)
    half = len(pieces) // 2
    audio = np.concatenate([x for p in pieces[:half] for x in (p, pause)] + [noise]
                           + [x for p in pieces[half:] for x in (p, pause)])
    import soundfile as sf

    sf.write(out_wav, audio, SR, subtype="FLOAT")
    return audio, " ".join(paras)


def wer(reference: str, hypothesis: str) -> float:
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    return 100 * jiwer.wer(norm(reference), norm(hypothesis))


def compile_programs(model, **kwargs) -> None:
    """Compiles (or loads from the on-disk cache) every decode program a run with ``kwargs``
    can meet: each prompt bucket, batch bucket up to ``batch_size``, greedy or beam at
    temperature 0 and best-of sampling above it. A seed's fallback trajectory otherwise meets
    programs the warm-up pass did not, and a timed pass paid their first compile (3-6 s each)."""
    import jax

    from whisperjax_cli.window_decoder import BATCH_BUCKETS, PROMPT_BUCKETS, LazyKey, build_prompt
    from whisperjax_cli.features import N_FRAMES
    from whisperjax_cli.longform import Transcriber
    from whisperjax_cli.options import TranscribeOptions

    transcriber = Transcriber(model, TranscribeOptions(**kwargs))
    decoder, tok = transcriber.decoder, model.tokenizer
    batched = transcriber.mode == "batched"  # its decodes hold end-of-text back: programs of their own
    temperatures = (0.0, 0.2) if len(transcriber.options.temperatures) > 1 else transcriber.options.temperatures
    sizes = [b for b in BATCH_BUCKETS if b <= max(1, transcriber.batch_size if batched else 1)]
    for n in sizes:
        audio = decoder.encode(np.zeros((n, N_FRAMES, model.n_mels), np.float32))
        for length in PROMPT_BUCKETS:  # previous text that fills the bucket: [sot_prev, *previous, *sot]
            previous = [tok.encode(" the")[0]] * max(0, length - 1 - len(tok.sot_sequence))
            prompt, tail = build_prompt(tok, tuple(tok.sot_sequence), previous, False, model.dims.n_text_ctx)
            for temperature in temperatures:
                decoder._decode_rows(audio, list(range(n)), [prompt] * n, tail, temperature, LazyKey(jax.random.PRNGKey(0)),
                                     [0] * n if batched else None)


def difference_interval(ours: list[float], theirs: list[float], level: float = 0.9, draws: int = 20_000):
    """Bootstrap interval of ``mean(ours) - mean(theirs)`` (passes resampled on each side
    independently): how far a run's difference of means could move with other draws."""
    rng = np.random.default_rng(0)
    a = np.asarray(ours)[rng.integers(0, len(ours), (draws, len(ours)))].mean(axis=1)
    b = np.asarray(theirs)[rng.integers(0, len(theirs), (draws, len(theirs)))].mean(axis=1)
    lo, hi = np.quantile(a - b, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def prepare_ours(model, audio, **kwargs) -> None:
    """Every decode program compiled (:func:`compile_programs`) and one untimed pass over the
    whole audio."""
    import jax

    from whisperjax_cli.longform import transcribe

    compile_programs(model, **kwargs)
    transcribe(model, audio, key=jax.random.PRNGKey(10_000), **kwargs)


def pass_ours(model, audio, seed, **kwargs) -> tuple[str, float]:
    """One timed pass; ``seed`` is the PRNG key of the fallback samples."""
    import jax

    from whisperjax_cli.longform import transcribe

    t0 = time.perf_counter()
    text = transcribe(model, audio, key=jax.random.PRNGKey(seed), **kwargs).text
    return text, time.perf_counter() - t0


def pass_faster_whisper(fw, audio, seed, **kwargs) -> tuple[str, float]:
    """One timed pass (CTranslate2's sampling seed set, though its sampling does not repeat)."""
    import ctranslate2

    ctranslate2.set_random_seed(seed)
    t0 = time.perf_counter()
    text = "".join(s.text for s in fw.transcribe(audio, **kwargs)[0])
    return text, time.perf_counter() - t0


def _synthesis(hours: float) -> str:
    """Python lines that build ``audio``: an ``hours``-long input, the benchmark speech at its
    start and at its end, between them dither far below -80 dBFS (real, resident pages that the
    silence gate skips without decoding, unlike zeros that the kernel never maps). Built in
    place: temporaries of the whole input would set the peak before transcription starts."""
    return f"""
speech = sf.read({str(OUT / 'longform.wav')!r}, dtype='float32')[0]
n = int({hours} * 3600 * 16000)
audio = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
audio *= 1e-5
np.clip(audio, -9e-5, 9e-5, out=audio)
audio[: len(speech)] = speech
audio[n - len(speech):] = speech
"""


def memory_run(model: str, hours: float, mode: str) -> dict:
    """Transcribes an ``hours``-long input in a fresh process; returns its peak RSS."""
    code = f"""
import json, resource, sys, time, numpy as np, soundfile as sf
def peak_mb():
    # VmHWM: this program's own peak. ru_maxrss also counts the parent's RSS at the fork that
    # started it (Linux keeps it across exec), which after the WER rows here is several GB.
    try:
        return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
from whisperjax_cli.loading import load_model
from whisperjax_cli.longform import transcribe_files
{_synthesis(hours)}
m = load_model({model!r})
base = peak_mb()
t0 = time.perf_counter(); segments = 0
for e in transcribe_files(m, [audio], mode={mode!r}, batch_size=8):
    segments += len(e.segments)
print(json.dumps(dict(audio_mb=audio.nbytes / 2**20, rss_before_mb=base, peak_rss_mb=peak_mb(),
                      seconds=time.perf_counter() - t0, segments=segments)))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_run_cli(model: str, hours: float, mode: str) -> dict:
    """``--memory-cli``: the same input written to a float WAV file, then ``wjx transcribe``
    of it as a user runs it (its own allocator settings, reading the file itself); the peak is
    the process's VmHWM, read every 50 ms until it exits (the last read is within 50 ms of the
    end, and the peak is reached while windows are decoded, not at exit)."""
    wav = OUT / f"memory-{hours:g}h.wav"
    if not wav.exists():
        part = wav.with_name(wav.name + ".part")
        code = f"import numpy as np, soundfile as sf\n{_synthesis(hours)}\n" \
               f"sf.write({str(part)!r}, audio, 16000, subtype='FLOAT', format='WAV')"
        subprocess.run([sys.executable, "-c", code], check=True)
        part.rename(wav)
    with tempfile.TemporaryDirectory(prefix="wjx-memory-") as tmp, tempfile.TemporaryFile("w+") as log:
        cmd = [sys.executable, "-m", "whisperjax_cli", "transcribe", str(wav), "-o", tmp, "-f", "json", "-q",
               "-m", model, "--mode", mode]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)  # a file: a pipe could fill and stall it
        peak = 0.0
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                peak = max(peak, next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM:")) / 1024)
            except (OSError, StopIteration):
                pass
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            log.seek(0)
            sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{log.read()}")
        segments = len(json.loads(next(Path(tmp).glob("*.json")).read_text())["segments"])
    return dict(audio_mb=wav.stat().st_size / 2**20, peak_rss_mb=peak, seconds=seconds, segments=segments)


# faster-whisper as its users run it: one process per file, the same model folder, float32.
FASTER_WHISPER_PROCESS = """
import json, sys
from faster_whisper import BatchedInferencePipeline, WhisperModel
path, audio, mode, beam, batch, threads, temperature = sys.argv[1:8]
model = WhisperModel(path, device="cpu", compute_type="float32", cpu_threads=int(threads))
kwargs = {} if temperature == "default" else {"temperature": float(temperature)}
if mode == "batched":
    segments, _ = BatchedInferencePipeline(model).transcribe(audio, batch_size=int(batch), beam_size=int(beam), **kwargs)
else:
    segments, _ = model.transcribe(audio, beam_size=int(beam), **kwargs)
print(json.dumps("".join(s.text for s in segments)))
"""


def whole_process(args, wav: Path, reference: Optional[str], duration: float) -> dict:
    """``--whole-process``: wall time of fresh processes, spawn to exit, as users run them:
    ``wjx transcribe FILE -o -`` against a faster-whisper script (``WhisperModel`` or its
    ``BatchedInferencePipeline``), alternately, ``--seeds`` runs each. wjx's compile cache is
    filled by one untimed run of each row first (that cold run's time is printed); with
    ``--profile`` every timed wjx run writes ``--profile`` and the mean of its phases is printed.
    Without a ``reference`` (``--audio`` alone) the WER columns stay empty."""
    from whisperjax_cli.hub import resolve_model
    from whisperjax_cli.profile import PHASES, cpu_description

    path = str(resolve_model(args.model))
    cache = OUT / "cache-longform"
    env = {**os.environ, "WJX_CACHE_DIR": str(cache)}
    temperature = "0" if args.no_fallback else "default"
    # fw-batched is BatchedInferencePipeline as users call it: beam 5 is its default (rows before
    # 2026-12-06 ran it so, unnamed); fw-batched-greedy decodes as wjx's batched mode does.
    fw_rows = {"fw-greedy": ("sequential", 1), "fw-beam5": ("sequential", 5), "fw-batched": ("batched", 5),
               "fw-batched-greedy": ("batched", 1)}
    batched = ["--mode", "batched", "--batch-size", str(args.batch_size)]
    wjx_rows = {  # row: (extra flags, the faster-whisper rows it is compared with)
        "wjx-greedy": ([], ["fw-greedy"]),
        "wjx-beam5": (["--beam-size", "5"], ["fw-beam5"]),
        "wjx-batched": (batched, ["fw-greedy", "fw-batched-greedy", "fw-batched"]),
        "wjx-batched-beam5": (batched + ["--beam-size", "5"], ["fw-batched"]),
        # faster-whisper's batched pipeline decodes without timestamps by default (segments are
        # its VAD chunks); this row does the same, wjx's default row writes timestamps.
        "wjx-batched-nots": (batched + ["--no-timestamps"], ["fw-batched-greedy"]),
    }
    wjx_rows = {k: v for k, v in wjx_rows.items() if k not in args.skip}

    def run_fw(name):
        mode, beam = fw_rows[name]
        cmd = [sys.executable, "-c", FASTER_WHISPER_PROCESS, path, str(wav), mode, str(beam), str(args.batch_size),
               str(args.threads), temperature]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1]), time.perf_counter() - t0, None

    def run_wjx(name, profile: bool):
        # "--temperature 0" alone is the ladder from 0 (OpenAI's CLI), as faster-whisper's temperature=0 is not.
        flags = wjx_rows[name][0] + (["--temperature", "0", "--temperature-increment-on-fallback", "0"]
                                     if args.no_fallback else [])
        report = OUT / f"profile-{name}.json"
        cmd = [sys.executable, "-m", "whisperjax_cli", "transcribe", str(wav), "-o", "-", "-q", "-m", args.model,
               "--threads", str(args.threads), *flags, *(["--profile", str(report)] if profile else [])]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=ROOT)
        seconds = time.perf_counter() - t0
        return out.stdout, seconds, json.loads(report.read_text()) if profile else None

    print(cpu_description())
    print(f"whole processes, spawn to exit: {duration / 60:.1f} min of audio, model {args.model}, {args.threads} "
          f"threads, float32 (wjx batched: what --mode batched picks on this CPU); {args.seeds} timed runs per row, "
          f"alternating; {'temperature 0 alone' if args.no_fallback else 'default temperature fallback'}")
    for name in wjx_rows:
        _, cold, _ = run_wjx(name, False)
        print(f"{name}: first run (fills the compile cache, or finds it filled): {cold:.1f} s", flush=True)
    runs = {name: [] for name in [*fw_rows, *wjx_rows]}
    needed = [r for r in fw_rows if any(r in compared for _, compared in wjx_rows.values())]
    for _ in range(args.seeds):
        for name in needed:
            runs[name].append(run_fw(name))
        for name in wjx_rows:
            runs[name].append(run_wjx(name, args.profile))
    results = {}
    print(f"{'row':14} {'seconds':>22} {'WER %':>22}")
    for name, done in runs.items():
        if not done:
            continue
        secs = [s for _, s, _ in done]
        results[name] = dict(seconds=secs, mean_seconds=float(np.mean(secs)))
        line = f"{name:14} {np.mean(secs):6.1f} [{min(secs):6.1f}, {max(secs):6.1f}]"
        if reference is not None:
            wers = [wer(reference, t) for t, _, _ in done]
            results[name].update(wers=wers, mean_wer=float(np.mean(wers)))
            line += f" {np.mean(wers):6.2f} [{min(wers):6.2f}, {max(wers):6.2f}]"
        print(line)
    for name, (_, compared) in wjx_rows.items():
        for fw_name in compared:
            ours, theirs = results[name], results[fw_name]
            line = f"{name} vs {fw_name}: {theirs['mean_seconds'] / ours['mean_seconds']:.2f}x faster"
            if reference is not None:
                lo, hi = difference_interval(ours["wers"], theirs["wers"])
                line += (f", WER {ours['mean_wer'] - theirs['mean_wer']:+.2f} (90 % bootstrap interval "
                         f"[{lo:+.2f}, {hi:+.2f}])")
            print(line)
    if args.profile:
        for name in wjx_rows:
            reports = [p for _, _, p in runs[name]]
            total = float(np.mean([p["total_seconds"] for p in reports]))
            names = [n for n in PHASES if any(n in p["phases"] for p in reports)]
            names += sorted({n for p in reports for n in p["phases"]} - set(names))
            print(f"\n{name}: where the time goes (mean of {len(reports)} runs, {total:.2f} s)")
            print(f"{'phase':16} {'seconds':>9} {'share':>6} {'count':>7}")
            for n in names:
                sec = float(np.mean([p["phases"].get(n, {}).get("seconds", 0.0) for p in reports]))
                count = float(np.mean([p["phases"].get(n, {}).get("count", 0) for p in reports]))
                print(f"{n:16} {sec:9.3f} {100 * sec / total:5.1f}% {count:7.1f}")
            results[name]["profile"] = reports
    results["cpu"] = cpu_description()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3, help="timed passes per row, one sampling seed each")
    parser.add_argument("--no-fallback", action="store_true",
                        help="both sides at temperature 0 alone (deterministic; see the docstring)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from here (more passes over runs)")
    parser.add_argument("--skip", nargs="*", default=[], help="rows to skip, e.g. 'fw-beam5' 'wjx-beam5'")
    parser.add_argument("--memory-hours", type=float, nargs="*", default=[],
                        help="input lengths for the peak-RSS runs, e.g. 1 2 (the growth between them is reported)")
    parser.add_argument("--memory-mode", default="sequential")
    parser.add_argument("--memory-only", action="store_true", help="skip the WER/RTFx rows")
    parser.add_argument("--memory-cli", action="store_true",
                        help="measure the memory of 'wjx transcribe' processes given a WAV file, not in-process calls")
    parser.add_argument("--whole-process", action="store_true",
                        help="time fresh processes (wjx transcribe, a faster-whisper script) spawn to exit")
    parser.add_argument("--profile", action="store_true",
                        help="with --whole-process: print where each wjx row's time goes (wjx transcribe --profile)")
    parser.add_argument("--audio", type=Path,
                        help="with --whole-process: time this audio file instead of the synthesised one")
    parser.add_argument("--reference", type=Path, help="with --audio: its transcript (text), for the WER columns")
    args = parser.parse_args()
    if args.reference is not None and args.audio is None:
        parser.error("--reference is the transcript of --audio")
    if args.whole_process:
        OUT.mkdir(parents=True, exist_ok=True)
        suffix = "-t0" if args.no_fallback else ""
        if args.audio is not None:  # audio of one's own (held-out speech), its transcript if any
            from whisperjax_cli.audio import load_audio

            reference = args.reference.read_text(encoding="utf-8") if args.reference is not None else None
            wav, duration = args.audio.resolve(), len(load_audio(args.audio)) / SR
            suffix += f"-{args.audio.stem}"
        else:
            audio, reference = synthesise(OUT / "longform.wav")
            wav, duration = OUT / "longform.wav", len(audio) / SR
        results = whole_process(args, wav, reference, duration)
        (OUT / f"longform-process-{args.model}{suffix}.json").write_text(json.dumps(results, indent=1))
        return 0
    if args.audio is not None:
        parser.error("--audio is for --whole-process runs")

    from faster_whisper import WhisperModel as FasterWhisper

    from whisperjax_cli.loading import load_model, throughput_dtype

    OUT.mkdir(parents=True, exist_ok=True)
    audio, reference = synthesise(OUT / "longform.wav")
    duration = len(audio) / SR
    model = load_model(args.model, dtype="float32")
    # What `wjx transcribe --mode batched` loads on this CPU: mixed precision where it has
    # bfloat16 dot instructions (float32 otherwise); its float32 row is shown next to it.
    batched_dtype = throughput_dtype("cpu") or "float32"
    batched_model = load_model(args.model, dtype=batched_dtype) if batched_dtype != "float32" else model
    fw = FasterWhisper(str(model.path), device="cpu", compute_type="float32", cpu_threads=args.threads)
    print(f"audio: {duration / 60:.1f} min, model {args.model}, {args.threads} threads, float32 "
          f"(wjx-batched: {batched_dtype}){', temperature 0 alone' if args.no_fallback else ''}")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    fw_settings = {"fw-greedy": dict(beam_size=1), "fw-beam5": dict(beam_size=5)}
    # Each wjx row and the faster-whisper row it is compared with run alternately, one pass
    # each per seed: the machine's speed drifts by 20-25 % over the minutes a row takes, and
    # alternating puts both sides of each ratio on the same minutes.
    rows = {
        "wjx-greedy": ("fw-greedy", model, {}),
        "wjx-beam5": ("fw-beam5", model, dict(beam_size=5)),
        "wjx-batched": ("fw-greedy", batched_model, dict(mode="batched", batch_size=args.batch_size)),
        "wjx-batched-f32": ("fw-greedy", model, dict(mode="batched", batch_size=args.batch_size)),
    }
    if batched_dtype == "float32":
        del rows["wjx-batched-f32"]  # the same as wjx-batched on a CPU without bfloat16 dot instructions
    if args.no_fallback:  # wjx's temperature=0 alone is OpenAI's ladder from 0; faster-whisper's is 0 alone
        for settings in fw_settings.values():
            settings["temperature"] = 0.0
        for _, _, kwargs in rows.values():
            kwargs.update(temperature=0.0, temperature_increment_on_fallback=0)
    rows = {} if args.memory_only else {k: v for k, v in rows.items() if k not in args.skip}
    for settings in fw_settings.values() if rows else ():
        list(fw.transcribe(audio[: 60 * SR], **settings)[0])  # warm-up on the first minute
    print(f"{len(seeds)} timed passes per row (seeds {seeds}), each wjx pass right after a pass of its "
          f"faster-whisper row; WER and seconds: mean [min, max]")
    print(f"{'configuration':16} {'WER %':>21} {'seconds':>20} {'RTFx':>6}  {'fw alongside':>21}")
    results, fw_runs = {}, {k: [] for k in fw_settings}
    suffix = "-t0" if args.no_fallback else ""

    def summary(runs):
        wers = [wer(reference, text) for text, _ in runs]
        secs = [seconds for _, seconds in runs]
        return dict(wer=float(np.mean(wers)), median_wer=float(np.median(wers)), wers=wers,
                    seconds=float(np.mean(secs)), all_seconds=secs, rtfx=duration / float(np.mean(secs)))

    def line(name, r, note):
        return (f"{name:16} {r['wer']:6.2f} [{min(r['wers']):6.2f}, {max(r['wers']):6.2f}] "
                f"{r['seconds']:6.1f} [{min(r['all_seconds']):5.1f}, {max(r['all_seconds']):5.1f}] {r['rtfx']:6.1f}  {note}")

    for name, (fw_name, wjx_model, kwargs) in rows.items():
        prepare_ours(wjx_model, audio, **kwargs)
        ours, theirs = [], []
        for seed in seeds:
            theirs.append(pass_faster_whisper(fw, audio, seed, **fw_settings[fw_name]))
            ours.append(pass_ours(wjx_model, audio, seed, **kwargs))
        # Each row compiles every bucket it may meet; all rows' programs at once exhaust
        # vm.max_map_count (XLA:CPU maps each program's code), so each row's are dropped.
        import jax

        jax.clear_caches()
        fw_runs[fw_name] += theirs
        r = results[name] = summary(ours)
        f = r["alongside"] = dict(row=fw_name, **summary(theirs))
        r["speed_vs_alongside"] = f["seconds"] / r["seconds"]
        print(line(name, r, f"{fw_name}: {f['wer']:6.2f} % {f['seconds']:6.1f} s -> {r['speed_vs_alongside']:.2f}x"),
              flush=True)
        (OUT / f"{name}{suffix}.txt").write_text(ours[0][0])
    for fw_name, runs in fw_runs.items():
        if runs:
            r = results[fw_name] = summary(runs)
            print(line(fw_name, r, f"(all {len(runs)} passes)"), flush=True)
            (OUT / f"{fw_name}{suffix}.txt").write_text(runs[0][0])
    for name, r in results.items():  # each wjx row against every pass of its faster-whisper row
        if "alongside" not in r:
            continue
        base = results[r["alongside"]["row"]]
        lo, hi = r["wer_delta_interval"] = difference_interval(r["wers"], base["wers"])
        print(f"{name:16} vs {r['alongside']['row']} (all {len(base['wers'])} passes): speed "
              f"{r['rtfx'] / base['rtfx']:.2f}x, WER delta {r['wer'] - base['wer']:+.2f} "
              f"(90 % bootstrap interval [{lo:+.2f}, {hi:+.2f}]), medians {r['median_wer']:.2f} vs "
              f"{base['median_wer']:.2f}")
    if results:  # --memory-only leaves the last run's rows in place
        (OUT / f"longform{suffix}.json").write_text(json.dumps(results, indent=1))
    runs = []
    for hours in args.memory_hours:
        mem = (memory_run_cli if args.memory_cli else memory_run)(args.model, hours, args.memory_mode)
        runs.append((hours, mem))
        before = (f" (model + audio before transcribing: {mem['rss_before_mb']:.0f} MB; transcription adds "
                  f"{mem['peak_rss_mb'] - mem['rss_before_mb']:.0f} MB)") if "rss_before_mb" in mem else " (wjx transcribe FILE)"
        print(f"memory: {hours:g} h input ({mem['audio_mb']:.0f} MB of 16 kHz audio), {args.memory_mode}: "
              f"peak RSS {mem['peak_rss_mb']:.0f} MB{before}, {mem['seconds']:.0f} s, {mem['segments']} segments",
              flush=True)
    if len(runs) > 1:
        (h0, m0), (h1, m1) = runs[0], runs[-1]
        print(f"memory: from {h0:g} h to {h1:g} h the peak grows {m1['peak_rss_mb'] - m0['peak_rss_mb']:.0f} MB "
              f"for {m1['audio_mb'] - m0['audio_mb']:.0f} MB more audio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
