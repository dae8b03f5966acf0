"""RTFx on every device present: an hour of speech, over batch sizes, from tiny.en to large-v3.

The hour is the speech clips of tests/data tiled with a second of silence between them.

* Real weights (``tiny.en``, ``base``): the batched pipeline (``transcribe_files``, mode batched,
  one file) over the hour. Reported: the first run (compiles included) and a second run.
* Official sizes with random weights (``large-v3``, ``large-v3-turbo``; any name of
  ``dims.OFFICIAL_DIMS``): random weights write no text, so every 30 s window is encoded and then
  decoded for exactly ``--decode-len`` tokens, end-of-text suppressed (about what 30 s of speech
  takes). Reported: the first batch (compiles) and the time of every window of the hour.

Batches are spread over all devices (``whisperjax_cli.parallel``: a mesh, rows split, parameters
replicated); ``--batch-sizes`` are per device. RTFx is audio seconds over wall seconds.

    python bench/accelerator.py                                     # a GPU or TPU machine
    python bench/accelerator.py --models tiny.en base --batch-sizes 1 8 --hours 0.05   # a CPU
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SPEECH = ("cards-001.flac", "cards-002.flac", "cards-003.flac", "cards-004.flac", "cards-005.flac",
          "forever.ogg", "goforward.flac", "numbers.flac", "something.wav")
REAL = ("tiny.en", "base")  # bundled: real weights


def speech_hours(hours: float, gap_s: float = 1.0) -> np.ndarray:
    """``hours`` of 16 kHz audio: the speech clips of tests/data in turn, ``gap_s`` of silence after each."""
    from whisperjax_cli.audio import load_audio

    gap = np.zeros(int(gap_s * 16000), np.float32)
    unit = np.concatenate([part for name in SPEECH for part in (load_audio(ROOT / "tests" / "data" / name), gap)])
    total = int(hours * 3600 * 16000)
    return np.tile(unit, math.ceil(total / len(unit)))[:total]


def machine_line(devices) -> str:
    """The devices the run spreads over: platform, kind, count (and the CPU model on a CPU)."""
    kind = devices[0].device_kind
    line = f"{len(devices)} x {devices[0].platform}" + ("" if kind == devices[0].platform else f" {kind}")
    if devices[0].platform == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                models = [x.split(":", 1)[1].strip() for x in f if x.startswith("model name")]
            line += f" ({models[0]}, {len(models)} cores)"
        except (OSError, IndexError):
            line += f" ({platform.processor()})"
    return line


def random_params(dims, dtype, seed: int = 0):
    """Parameters of the Linen model of ``dims``, drawn on the device: normal(0, 0.02), norm
    scales 1. Shapes come from ``jax.eval_shape`` (no forward pass at the real size); each
    tensor is drawn by a program per shape (one program drawing them all took 2 min to compile)."""
    import functools

    import jax
    import jax.numpy as jnp

    from whisperjax_cli.model import Whisper

    @functools.partial(jax.jit, static_argnames=("shape",))
    def normal(key, shape):
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    module = Whisper(dims, dtype)
    mel, tokens = jnp.zeros((1, 2 * dims.n_audio_ctx, dims.n_mels)), jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), mel, tokens))["params"]
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    params = [jnp.ones(s.shape, dtype) if "scale" in jax.tree_util.keystr(path) else normal(k, tuple(s.shape))
              for (path, s), k in zip(leaves, keys)]
    return module, jax.tree_util.tree_unflatten(tree, params)


def fixed_length_run(module, params, mels: np.ndarray, batch: int, decode_len: int, placement) -> tuple[float, float]:
    """Encodes and decodes every window of ``mels`` ``[windows, 3000, n_mels]``, ``batch`` at a
    time, each row ``decode_len`` tokens; returns ``(first batch s, all windows s)``."""
    import jax

    from whisperjax_cli.decoding import DecodeInputs, LoopConfig, decode_window, encode

    dims = module.dims
    eot = min(50257, dims.n_vocab - 1)
    ban_eot = np.zeros(dims.n_vocab, bool)
    ban_eot[eot] = True
    config = LoopConfig(sample_len=decode_len, eot=eot, no_speech=None, timestamps=None)
    prompt = np.minimum(np.array([[50258, 50259, 50360, 50364]], np.int32), dims.n_vocab - 1).repeat(batch, 0)

    def one(chunk: np.ndarray):
        padded = np.zeros((batch, *chunk.shape[1:]), np.float32)
        padded[: len(chunk)] = chunk
        rows = np.int32(len(chunk))
        if placement is None:
            audio = encode(module, params, padded, rows)
        else:
            audio = placement.encode(module, params, padded, rows)
        inputs = DecodeInputs(audio, prompt, np.zeros(batch, np.int32), np.int32(0), ban_eot, np.zeros_like(ban_eot),
                              np.float32(0), np.zeros(2, np.uint32))
        out = decode_window(module, params, inputs, config) if placement is None else placement.decode(
            decode_window, module, params, inputs, config)
        return jax.device_get(out.tokens)

    start = time.perf_counter()
    one(mels[:batch])
    first = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, len(mels), batch):
        one(mels[i : i + batch])
    return first, time.perf_counter() - start


def window_mels(audio: np.ndarray, n_mels: int) -> np.ndarray:
    """The log-mel windows of ``audio``, one per 30 s: ``[windows, 3000, n_mels]``."""
    from whisperjax_cli.features import N_FRAMES, LogMelWindows, model_window

    mel = LogMelWindows(audio, n_mels, padding=480000)
    count = math.ceil((mel.n_frames - N_FRAMES) / N_FRAMES)
    return np.stack([model_window(mel, i * N_FRAMES, N_FRAMES) for i in range(count)]).astype(np.float32)


def pipeline_run(model, audio: np.ndarray, batch: int) -> tuple[float, float, int]:
    """Batched transcription of ``audio`` as one file, twice; ``(first s, second s, segments)``."""
    from whisperjax_cli.longform import transcribe_files

    times, segments = [], 0
    for _ in range(2):
        start = time.perf_counter()
        events = list(transcribe_files(model, [audio], mode="batched", batch_size=batch))
        times.append(time.perf_counter() - start)
        segments = sum(len(e.segments) for e in events)
    return times[0], times[1], segments


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base", "large-v3-turbo", "large-v3"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32, 64], help="windows per device")
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--decode-len", type=int, default=100, help="tokens per window (random weights)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 ... (default: the device's)")
    parser.add_argument("--devices", type=int, default=None, help="devices to spread over (default: all)")
    args = parser.parse_args()

    import jax

    from whisperjax_cli.dims import OFFICIAL_DIMS
    from whisperjax_cli.loading import default_dtype, load_model
    from whisperjax_cli.parallel import make_mesh, place_model, place_params, placement_of

    devices = jax.devices()[: args.devices]
    dtype = jax.numpy.dtype(args.dtype or default_dtype())
    audio = speech_hours(args.hours)
    seconds = len(audio) / 16000
    print(f"jax {jax.__version__} on {machine_line(devices)}; {seconds / 3600:.3f} h of audio; {dtype.name}")
    print(f"{'model':16} {'weights':8} {'batch':>9} {'windows':>7} {'first s':>8} {'run s':>8} {'RTFx':>8} "
          f"{'tok/s':>8}")
    for name in args.models:
        real = name in REAL
        if real:
            model = place_model(load_model(name, dtype=dtype.name), devices)
        else:
            module, params = random_params(OFFICIAL_DIMS[name], dtype)
            params = params if len(devices) == 1 else place_params(params, make_mesh(devices))
            mels = window_mels(audio, module.dims.n_mels)
        for per_device in args.batch_sizes:
            batch = per_device * len(devices)
            if real:
                first, run, segments = pipeline_run(model, audio, batch)
                windows, tokens = "-", f"{segments} seg"
            else:
                first, run = fixed_length_run(module, params, mels, batch, args.decode_len, placement_of(params))
                windows, tokens = len(mels), f"{len(mels) * args.decode_len / run:.0f}"
            label = f"{per_device}x{len(devices)}"
            print(f"{name:16} {'real' if real else 'random':8} {label:>9} {windows!s:>7} {first:8.1f} {run:8.1f} "
                  f"{seconds / run:8.1f} {tokens:>8}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
