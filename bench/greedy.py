"""Greedy short-form decoding: wjx against faster-whisper on the same clips and weights.

Both sides get the same 16 kHz arrays (decoded once by wjx's loader), float32, beam 1,
temperature 0, without timestamps. Reports the first call (compile included for wjx) and the
steady state (best of ``--repeats`` passes over all clips), and checks that tokens agree.

    python bench/greedy.py --models tiny.en base --threads 2
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    parser.add_argument("--clips", default=str(ROOT / "tests" / "data" / "*.*"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    from faster_whisper import WhisperModel as FasterWhisper

    from whisperjax_cli.audio import load_audio
    from whisperjax_cli.loading import load_model
    from whisperjax_cli.longform import transcribe

    clips = sorted(p for p in glob.glob(args.clips) if not p.endswith("NOTICE"))
    audios = [load_audio(p) for p in clips]
    seconds = sum(len(a) for a in audios) / 16000
    print(f"{len(clips)} clips, {seconds:.1f} s of audio, {args.threads} threads")
    print(f"{'model':8} {'impl':14} {'first pass s':>12} {'steady s':>9} {'RTFx':>7} {'tokens equal':>12}")
    for name in args.models:
        model = load_model(name, dtype="float32")
        fw = FasterWhisper(str(model.path), device="cpu", compute_type="float32", cpu_threads=args.threads)
        opts = dict(temperature=0.0, without_timestamps=True)

        def ours():
            return [[t for s in transcribe(model, a, **opts).segments for t in s.tokens] for a in audios]

        def theirs():
            out = []
            for a in audios:
                segs, _ = fw.transcribe(a, beam_size=1, condition_on_previous_text=False, **opts)
                out.append([t for s in segs for t in s.tokens])
            return out

        for label, fn in (("faster-whisper", theirs), ("wjx", ours)):
            t0 = time.perf_counter()
            tokens = fn()
            first = time.perf_counter() - t0
            steady = min(_timed(fn) for _ in range(args.repeats))
            if label == "faster-whisper":
                reference = tokens
            same = sum(a == b for a, b in zip(tokens, reference))
            print(f"{name:8} {label:14} {first:12.2f} {steady:9.2f} {seconds / steady:7.1f} {same:>6}/{len(clips)}")
    return 0


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
