"""Greedy short-form decoding: wjx against faster-whisper on the same clips and weights.

Both sides get the same 16 kHz arrays (decoded once by wjx's loader), float32, beam 1,
temperature 0, without timestamps. Reports the first call (compile included for wjx) and the
steady state (best of ``--repeats`` passes over all clips), and checks that tokens agree; for a
clip whose tokens differ, where they first do and how near a tie CTranslate2's own logits were
there (faster-whisper's decode of it again, untimed, with ``return_logits_vocab``).

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
        for clip, audio, mine, other in zip(clips, audios, tokens, reference):
            if mine != other:  # untimed: how near a tie CTranslate2's own logits were where the tokens part
                print("   ", near_tie(fw, audio, mine, other, opts, Path(clip).name))
    return 0


class _Recording:
    """faster-whisper's CTranslate2 model, its ``generate`` calls also returning the logits of
    each step (``return_logits_vocab``), kept in ``results``: faster-whisper's own options."""

    def __init__(self, model):
        self._model, self.results = model, []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, *args, **kwargs):
        out = self._model.generate(*args, return_logits_vocab=True, **kwargs)
        self.results.extend(out)
        return out


def near_tie(fw, audio, mine: list[int], other: list[int], opts: dict, name: str) -> str:
    """Where wjx's tokens first differ from faster-whisper's, and how far apart CTranslate2's
    logits put the two choices at that step (a clip is one window: one ``generate`` call)."""
    import numpy as np

    step = next((i for i, (a, b) in enumerate(zip(mine, other)) if a != b), min(len(mine), len(other)))
    recording = _Recording(fw.model)
    fw.model = recording
    try:
        list(fw.transcribe(audio, beam_size=1, condition_on_previous_text=False, **opts)[0])
    finally:
        fw.model = recording._model
    if step >= min(len(mine), len(other)):
        from whisperjax_cli.decoding import loop_start

        longer = other if len(other) > len(mine) else mine
        start = loop_start(np.asarray(longer), max(longer) + 1)  # without timestamps: none to count alike
        who, short = ("faster-whisper", "wjx") if longer is other else ("wjx", "faster-whisper")
        return (f"{name}: first differs at token {step + 1} of {len(other)}: {short}'s {min(len(mine), len(other))} tokens are the start of {who}'s {len(longer)}, "
                + (f"which repeat themselves from token {start + 1} on (wjx ends a row once it loops: stop_loops)"
                   if start < len(longer) else "which do not repeat themselves"))
    sys.path.insert(0, str(ROOT / "bench"))
    from sizes import differences  # the same report for bench/sizes.py's rows

    logits = [recording.results[0].logits] if recording.results else None
    return f"{name}: " + differences([mine], [other], logits)[0]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
