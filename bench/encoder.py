"""Encoder cost per 30 s window: CTranslate2 (faster-whisper's engine) against wjx, same weights.

Both in float32 on this process's cores, one window of log-mel (random, the cost does not depend
on it), best of ``--repeats`` after one warm-up call. The long-form profile (``bench/longform.py
--whole-process --profile``) puts 20-38 % of a run in the encoder; this says whether that part
is slower than faster-whisper's.

    python bench/encoder.py --models tiny.en base
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def best_of(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    from whisperjax_cli import runtime

    runtime.configure("cpu", args.threads)
    import ctranslate2

    from whisperjax_cli.decoding import encode
    from whisperjax_cli.hub import resolve_model
    from whisperjax_cli.loading import load_model
    from whisperjax_cli.profile import cpu_description

    print(cpu_description())
    for name in args.models:
        model = load_model(name, dtype="float32")
        mel = (np.random.default_rng(0).standard_normal((1, 3000, model.dims.n_mels)) * 0.5).astype(np.float32)
        ct2 = ctranslate2.models.Whisper(str(resolve_model(name)), device="cpu", compute_type="float32",
                                         intra_threads=args.threads)
        features = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel.transpose(0, 2, 1)))
        theirs = best_of(lambda: ct2.encode(features, to_cpu=True), args.repeats)
        ours = best_of(lambda: encode(model.module, model.params, mel, np.int32(1)).block_until_ready(), args.repeats)
        print(f"{name}: encoder per 30 s window, CTranslate2 {theirs * 1000:.0f} ms, wjx {ours * 1000:.0f} ms "
              f"(wjx time / CTranslate2's: {ours / theirs:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
