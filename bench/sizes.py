"""Per-window costs by model size: wjx against CTranslate2 (faster-whisper's engine), same weights.

Whisper's larger sizes are timed with random weights in their official dimensions (``small``:
768 wide, 12 + 12 layers; ``medium``: 1024, 24 + 24), written once as a CTranslate2 ``model.bin``
under ``bench/out/random-<size>-<scale>/`` with base's vocabulary and tokenizer, so that both engines
load the very same file. Real models (``tiny.en``, ``base``) can be given too, as the anchor.

Both sides in float32 on this process's cores, from the same encoder input, steady state (best
of ``--repeats`` after a warm-up call):

* encoder: one 30 s window;
* greedy: one window, ``--steps`` tokens (end-of-text suppressed on both sides, without
  timestamps, so each decodes exactly that many; wjx's loop stop off), ms per token;
* beam 5: the same, ms per step of 5 beams;
* batch 8: eight windows greedily side by side, ms per step of 8 rows;
* beam 5, 8 windows: eight windows' beams side by side (batched mode with ``--beam-size 5``),
  ms per step of 40 rows.

Where the CPU has bfloat16 dot instructions, the encoder and the 8-row decode are timed once
more with wjx in mixed precision, as ``wjx transcribe --mode batched`` runs them there
(CTranslate2 still float32, the dtype issue #24 compares against).

Random weights make random text, so these are the costs of the loop's parts, not of a
transcription (``bench/longform.py`` times those). The tokens both sides chose are compared;
where a row differs, the step where it first does is printed, for greedy rows with how far
apart CTranslate2's own logits put the two choices there (a near-tie, or not).

    python bench/sizes.py --models tiny.en base small --steps 100
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
# Official dimensions (OpenAI's whisper/__init__.py): width, heads, layers (encoder = decoder).
SIZES = {"small": (768, 12, 12), "medium": (1024, 16, 24)}
SCALE = 0.2  # the weights' standard deviation: with 0.02 the decoder writes one token over and over


def random_model(size: str) -> Path:
    """``bench/out/random-<size>-<scale>/``: base's files with a model.bin of ``size``'s dimensions and
    random weights (:func:`~whisperjax_cli.weights.random_ct2`), made once."""
    from whisperjax_cli import weights
    from whisperjax_cli.hub import resolve_model

    width, heads, layers = SIZES[size]
    folder = OUT / f"random-{size}-{SCALE}"
    if (folder / "model.bin").exists():
        return folder
    return weights.random_ct2(resolve_model("base"), folder, width, heads, (layers, layers), scale=SCALE)


def differences(mine: list[list[int]], other: list[list[int]], logits=None) -> list[str]:
    """Where each row's tokens first differ from CTranslate2's, and with its per-step
    ``logits`` (``return_logits_vocab``) how near a tie that step was for CTranslate2."""
    notes = []
    for row, (a, b) in enumerate(zip(mine, other)):
        step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if step is None:
            continue
        note = f"row {row}: first differs at token {step + 1} of {len(b)} (wjx {a[step]}, CTranslate2 {b[step]})"
        if logits is not None:
            values = np.asarray(logits[row][0][step], np.float64)
            ranked = np.sort(values)[::-1]
            note += (f"; CTranslate2's logits there: {values[b[step]]:.4f} against wjx's choice {values[a[step]]:.4f}, "
                     f"its two best {ranked[0] - ranked[1]:.1e} apart, its ten best {ranked[0] - ranked[9]:.2f}")
        notes.append(note)
    return notes


def best_of(fn, repeats: int) -> tuple[float, object]:
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base", "small"],
                        help="bundled names (real weights) or small / medium (random weights)")
    parser.add_argument("--steps", type=int, default=100, help="tokens decoded per window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    from whisperjax_cli import runtime

    runtime.configure("cpu", args.threads)
    import ctranslate2
    import jax

    from whisperjax_cli.decoding import encode
    from whisperjax_cli.hub import resolve_model
    from whisperjax_cli.loading import cpu_has_bfloat16_dot, load_model
    from whisperjax_cli.options import TranscribeOptions
    from whisperjax_cli.profile import cpu_description
    from whisperjax_cli.window_decoder import WindowDecoder

    print(cpu_description(), f"{args.threads} threads, float32, {args.steps} tokens a window", flush=True)
    print(f"{'model':8} {'part':36} {'CTranslate2':>12} {'wjx':>10} {'wjx / CT2':>10}  tokens equal")
    for name in args.models:
        path = random_model(name) if name in SIZES else resolve_model(name)
        model = load_model(str(path), dtype="float32")
        tok = model.tokenizer
        prompt = list(tok.sot_sequence_for("en" if model.dims.is_multilingual else None, "transcribe"))
        prompt.append(tok.no_timestamps)
        ct2 = ctranslate2.models.Whisper(str(path), device="cpu", compute_type="float32", intra_threads=args.threads)
        rng = np.random.default_rng(0)
        mels = (rng.standard_normal((8, 3000, model.dims.n_mels)) * 0.5).astype(np.float32)
        features = ctranslate2.StorageView.from_array(np.ascontiguousarray(mels.transpose(0, 2, 1)))
        label = name + (" (random)" if name in SIZES else "")

        def row(part: str, theirs: float, ours: float, unit: float = 1.0, equal: str = "") -> None:
            print(f"{label:8} {part:36} {theirs / unit * 1000:9.1f} ms {ours / unit * 1000:7.1f} ms "
                  f"{ours / theirs:10.2f}  {equal}", flush=True)

        one = ctranslate2.StorageView.from_array(np.ascontiguousarray(mels[:1].transpose(0, 2, 1)))
        theirs, _ = best_of(lambda: ct2.encode(one, to_cpu=True), args.repeats)
        ours, _ = best_of(lambda: encode(model.module, model.params, mels[:1], np.int32(1)).block_until_ready(),
                          args.repeats)
        row("encoder, 1 window", theirs, ours)
        # On a CPU with bfloat16 dot instructions batched mode runs in mixed precision (load_model's "mixed").
        mixed = load_model(str(path), dtype="mixed") if cpu_has_bfloat16_dot() else None
        if mixed is not None:
            ours, _ = best_of(lambda: encode(mixed.module, mixed.params, mels[:1], np.int32(1)).block_until_ready(),
                              args.repeats)
            row("encoder, 1 window (wjx mixed)", theirs, ours)

        encoded = np.asarray(ct2.encode(features, to_cpu=True))
        for part, beam, n in (("greedy, 1 window", None, 1), ("beam 5, 1 window", 5, 1), ("greedy, 8 windows", None, 8),
                              ("beam 5, 8 windows", 5, 8)):
            opts = TranscribeOptions(temperature=(0.0,), without_timestamps=True, beam_size=beam, sample_len=args.steps,
                                     suppress_tokens=f"-1,{tok.eot}", suppress_blank=False, stop_loops=False)
            audio = jax.block_until_ready(jax.numpy.asarray(encoded[:n]))
            source = ctranslate2.StorageView.from_array(np.ascontiguousarray(encoded[:n]))

            def run_ours(decoder=WindowDecoder(model, opts)):
                return decoder.decode(audio, n, [prompt] * n, len(prompt), None)

            def run_theirs(logits: bool = False):
                return ct2.generate(source, [prompt] * n, beam_size=beam or 1,
                                    max_length=2 * args.steps,  # CTranslate2 decodes half of it
                                    suppress_tokens=[-1, tok.eot], suppress_blank=False, return_logits_vocab=logits)

            t_theirs, r_theirs = best_of(run_theirs, args.repeats)
            t_ours, r_ours = best_of(run_ours, args.repeats)
            mine = [list(r.tokens) for r in r_ours]
            other = [list(r.sequences_ids[0]) for r in r_theirs]
            lengths = {len(t) for t in mine} | {len(t) for t in other}
            if lengths != {args.steps}:
                print(f"  (decoded lengths {sorted(lengths)}, not {args.steps} each: per-token figures are off)")
            same = sum(a == b for a, b in zip(mine, other))
            row(part + " / token", t_theirs, t_ours, args.steps, f"{same}/{n}")
            if same < n:  # untimed: how near a tie each first difference was (greedy: one hypothesis a row)
                logits = [r.logits for r in run_theirs(logits=True)] if not beam else None
                for note in differences(mine, other, logits):
                    print("   ", note)
            if n == 8 and not beam and mixed is not None:  # what `wjx transcribe --mode batched` runs on this CPU
                mixed_decoder = WindowDecoder(mixed, opts)
                t_mixed, _ = best_of(lambda: run_ours(mixed_decoder), args.repeats)
                row(part + " / token (wjx mixed)", t_theirs, t_mixed, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
