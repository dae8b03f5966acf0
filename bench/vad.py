"""Seconds to find speech in 1 h of audio: wjx's Silero VAD (JAX) vs faster-whisper's (onnxruntime).

Usage: ``python bench/vad.py [--minutes 60] [--repeats 2]``

The audio is real speech from tests/data (each clip at a random gain) between stretches of
silence, white or pink noise, tones and crackle, built with a fixed seed. Both sides compute
the same thing, faster-whisper's ``get_speech_timestamps`` with default options: wjx with
:func:`whisperjax_cli.vad.speech_timestamps`, faster-whisper with its own code and ONNX model,
on one onnxruntime thread as faster-whisper configures it, then with a session given every
core. Each is timed ``--repeats`` times and the best is kept; wjx's first call, which compiles
its programs, is reported apart. The segments must be identical, else the script exits 1.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from whisperjax_cli.audio import SAMPLE_RATE, load_audio  # noqa: E402


def cpu_description() -> str:
    """The CPU model and whether it has AVX-512, AVX-512 BF16 and AMX (whisperjax_cli.profile's)."""
    from whisperjax_cli.profile import cpu_description as describe

    return describe()


def _gap(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` samples of one kind of non-speech: silence, white or pink noise, a tone, crackle."""
    kind = rng.integers(5)
    if kind == 0:
        return np.zeros(n, np.float32)
    if kind == 1:
        return (rng.standard_normal(n) * rng.uniform(0.001, 0.05)).astype(np.float32)
    if kind == 2:  # pink: white noise shaped 1/sqrt(f) in the frequency domain
        spectrum = np.fft.rfft(rng.standard_normal(n))
        spectrum /= np.sqrt(np.maximum(np.arange(spectrum.size), 1))
        pink = np.fft.irfft(spectrum, n)
        return (pink / (np.abs(pink).max() + 1e-9) * rng.uniform(0.01, 0.2)).astype(np.float32)
    if kind == 3:
        t = np.arange(n) / SAMPLE_RATE
        return (np.sin(2 * np.pi * rng.uniform(100, 4000) * t) * rng.uniform(0.01, 0.3)).astype(np.float32)
    crackle = np.zeros(n, np.float32)
    clicks = rng.integers(0, n, size=max(1, n // 800))
    crackle[clicks] = rng.uniform(-0.8, 0.8, size=clicks.size)
    return crackle


def long_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Speech clips from tests/data between non-speech gaps of 0.2 to 8 s, ``seconds`` long."""
    files = sorted(f for f in glob.glob(os.path.join(ROOT, "tests", "data", "*")) if not f.endswith("NOTICE"))
    clips = [load_audio(f) for f in files]
    rng = np.random.default_rng(seed)
    parts, total = [], 0
    while total < seconds * SAMPLE_RATE:
        clip = clips[rng.integers(len(clips))] * rng.uniform(0.3, 1.5)
        gap = _gap(rng, int(rng.uniform(0.2, 8.0) * SAMPLE_RATE))
        parts += [clip.astype(np.float32), gap]
        total += clip.size + gap.size
    return np.concatenate(parts)[: int(seconds * SAMPLE_RATE)]


def best_of(repeats: int, run) -> tuple[float, object]:
    """The shortest wall time of ``repeats`` calls of ``run``, and its last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def two_thread_onnx_model():
    """faster-whisper's SileroVADModel, its onnxruntime session given both cores instead of one."""
    import onnxruntime
    from faster_whisper.utils import get_assets_path
    from faster_whisper.vad import SileroVADModel

    path = os.path.join(get_assets_path(), "silero_vad_v6.onnx")
    model = SileroVADModel(path)
    opts = onnxruntime.SessionOptions()
    opts.inter_op_num_threads, opts.intra_op_num_threads = 1, os.cpu_count() or 2
    opts.log_severity_level = 4
    model.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"], sess_options=opts)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import faster_whisper.vad as fw_vad
    import jax
    from faster_whisper.vad import VadOptions as FwOptions
    from faster_whisper.vad import get_speech_timestamps

    from whisperjax_cli import vad
    from whisperjax_cli.vad_weights import load_weights

    print(cpu_description())
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; audio: {args.minutes:g} min, best of {args.repeats}")
    audio = long_audio(args.minutes * 60)
    params = load_weights()

    start = time.perf_counter()
    vad.speech_timestamps(audio, params=params)
    first = time.perf_counter() - start
    ours_s, ours = best_of(args.repeats, lambda: vad.speech_timestamps(audio, params=params))
    theirs_s, theirs = best_of(args.repeats, lambda: get_speech_timestamps(audio, FwOptions()))
    two_threads = two_thread_onnx_model()
    fw_vad.get_vad_model = lambda: two_threads  # where get_speech_timestamps finds its model
    threads_s, threads = best_of(args.repeats, lambda: get_speech_timestamps(audio, FwOptions()))

    hour = 3600 / (args.minutes * 60)
    for label, seconds, note in (
        ("wjx (JAX)", ours_s, f"first call {first:.2f} s with compilation"),
        ("faster-whisper (onnxruntime)", theirs_s, "1 thread, faster-whisper's setting"),
        (f"onnxruntime, {os.cpu_count()} threads", threads_s, "faster-whisper's code, session given every core"),
    ):
        print(f"{label:30} {seconds:7.2f} s  ({seconds * hour:.2f} s per hour of audio; {note})")
    same = ours == theirs == threads
    print(f"speed-up {theirs_s / ours_s:.2f}x ({threads_s / ours_s:.2f}x vs {os.cpu_count()} threads); "
          f"{len(ours)} speech segments; identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
