"""What batching requests can buy on this machine: the most that any scheduler could make of
bench/serve.py's workload, measured in-process with the library.

``wjx serve`` batches concurrent requests (continuous batching); bench/serve.py measures the
throughput of 8 concurrent clients against the same requests one at a time. This script bounds
that ratio from above, from two measurements on the same clips (bench/serve.py's, same seed):

1. **One at a time**: every clip transcribed alone (``transcribe_files``, sequential mode, the
   server's default options), with the time of each phase (:mod:`whisperjax_cli.profile`).
2. **A batch's cost**: one real window of the first clip decoded alone, and as 8 copies side
   by side (``WindowDecoder.decode``, greedy): the copies decode the same tokens, so both take
   the same number of steps and the ratio ``r`` is what 8 rows cost against 1, step for step.
   Its encoder is timed alone and as 8 windows the same way.

Batching cannot make the encoder cheaper than it is at its best per window, nor a decode step
cheaper per row than ``r / 8``; the audio reading, log-mel and host work stay as they are. So
concurrent requests take at least ``encoder * e + decode * r / 8 + rest``, ``e`` the per-window
encoder cost in a batch of 8 against alone (capped at 1), and one at a time over that is the
ceiling printed: the best any scheduler could reach here, with every row busy at every step.
It is generous: fallback passes, counted as single rows, already decode their best-of samples
side by side. On a machine where a step of 8 rows costs little more than one (a GPU), it is high.

    python bench/batching.py --model tiny.en --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def _median_seconds(fn, repeats: int) -> float:
    fn()  # compile, or read the compiled program
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default=None, help="default: the server's (float32 on CPU)")
    parser.add_argument("--clips", type=int, default=16, help="clips of 30-60 s (bench/serve.py: 8 clients x 2)")
    parser.add_argument("--rows", type=int, default=8, help="the server's --batch-size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from whisperjax_cli import runtime

    runtime.configure(None, args.threads)
    import jax
    import numpy as np
    from serve import cpu_model, make_clips

    from whisperjax_cli.audio import load_audio
    from whisperjax_cli.features import LogMelWindows, model_window
    from whisperjax_cli.loading import load_model
    from whisperjax_cli.longform import transcribe_files
    from whisperjax_cli.options import TranscribeOptions
    from whisperjax_cli.profile import Timings
    from whisperjax_cli.window_decoder import WindowDecoder, build_prompt

    print(cpu_model())
    model = load_model(args.model, dtype=args.dtype)
    options = TranscribeOptions(batch_size=args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        clips = [str(p) for p, _ in make_clips(Path(tmp), args.clips, 30, 60, args.seed)]
        audio = load_audio(clips[0])
        list(transcribe_files(model, clips[:1], options=options))  # compile the one-at-a-time programs
        timings = Timings()
        start = time.perf_counter()
        for clip in clips:
            list(transcribe_files(model, [clip], options=options, timings=timings))
        one_at_a_time = time.perf_counter() - start
    phases = timings.seconds
    encoder = phases.get("encoder", 0.0)
    decode = phases.get("decode", 0.0) + phases.get("fallback decode", 0.0)
    rest = one_at_a_time - encoder - decode

    decoder = WindowDecoder(model, TranscribeOptions(batch_size=args.rows, temperature=(0.0,)))  # no fallback pass
    tok = model.tokenizer
    mel = LogMelWindows(audio, model.dims.n_mels)
    window = model_window(mel, 0, min(mel.n_frames, 3000))
    prompt, tail = build_prompt(tok, tok.sot_sequence, [], False, model.dims.n_text_ctx)
    key = jax.random.PRNGKey(0)

    def encode(n):
        return jax.block_until_ready(decoder.encode(np.stack([window] * n)))

    one, many = encode(1), encode(args.rows)
    encode_1 = _median_seconds(lambda: encode(1), args.repeats)
    encode_n = _median_seconds(lambda: encode(args.rows), args.repeats) / args.rows
    step_1 = _median_seconds(lambda: decoder.decode(one, 1, [prompt], tail, key), args.repeats)
    step_n = _median_seconds(lambda: decoder.decode(many, args.rows, [prompt] * args.rows, tail, key), args.repeats)
    tokens = len(decoder.decode(one, 1, [prompt], tail, key)[0].tokens)

    r = step_n / step_1
    e = min(1.0, encode_n / encode_1)
    floor = encoder * e + decode * r / args.rows + rest
    dtype = "mixed" if model.matmul_dtype is not None else np.dtype(model.dtype).name
    print(f"model {args.model}, {dtype}, {args.clips} clips of 30-60 s, batch of {args.rows}")
    print(f"one at a time: {one_at_a_time:.1f} s = encoder {encoder:.1f} + decode and fallback {decode:.1f} "
          f"+ the rest {rest:.1f}")
    print(f"one window ({tokens} tokens) decoded alone {step_1 * 1e3:.0f} ms, {args.rows} copies side by side "
          f"{step_n * 1e3:.0f} ms: a row-step costs {r / args.rows:.2f} of one alone (x{r:.2f} for {args.rows} rows)")
    print(f"encoder per window: alone {encode_1 * 1e3:.0f} ms, in a batch of {args.rows} {encode_n * 1e3:.0f} ms")
    print(f"concurrent requests take at least {floor:.1f} s: throughput ceiling x{one_at_a_time / floor:.2f} "
          f"over one at a time (issue #26's bar: x2.5)")
    print(cpu_model())
    return 0


if __name__ == "__main__":
    sys.exit(main())
