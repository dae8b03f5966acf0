"""``wjx serve`` under load: concurrent clients against the same requests one at a time, then a soak.

The server runs as its own process (``python -m whisperjax_cli.cli_serve``, loopback only), so
its resident memory can be sampled alone. Clips of 30-60 s are made from the dev clips in
tests/data, in a shuffled order with 0.3-1 s pauses (FLAC, written to a temporary folder).

1. Warm-up, untimed: the concurrent phase once and one request alone, so every batch and prompt
   bucket the timed phases meet is compiled first (or read from the compile cache).
2. ``--clients`` clients each send ``--per-client`` clips, all at once; then the same requests
   one at a time (alternating for ``--passes`` passes, since the machine's speed drifts). For
   each: requests/s, audio seconds per second, p50/p95 latency; the ratio of the two is what
   continuous batching buys on this machine. Greedy windows give the same text either way; a
   window that falls back to sampling draws from its feed's key, so texts may differ there
   (counted, not failed).
3. Soak: ``--soak`` short requests (single dev clips) from ``--clients`` clients, every
   ``--bad-every``-th an upload that is not audio (which must get a 400). Every good request
   must get 200 and the text that clip got alone; the server's RSS is sampled every 0.5 s and
   its first, last and largest values printed.

    python bench/serve.py --model tiny.en --threads 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
SHORT = ("goforward.flac", "something.wav", "cards-005.flac", "numbers.flac", "cards-001.flac", "cards-002.flac",
         "cards-003.flac", "cards-004.flac", "forever.mp3")


def cpu_model() -> str:
    """The CPU model and flags (whisperjax_cli.profile's), with the load average."""
    from whisperjax_cli.profile import cpu_description

    return f"{cpu_description()}, load average {os.getloadavg()[0]:.1f}"


def make_clips(folder: Path, count: int, low: float, high: float, seed: int) -> list[tuple[Path, float]]:
    """``count`` FLAC files of ``low``-``high`` s: dev clips in a shuffled order with pauses."""
    from whisperjax_cli.audio import load_audio

    pieces = [load_audio(DATA / name) for name in SHORT]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        target, parts, n = rng.uniform(low, high) * 16000, [], 0
        while n < target:
            parts += [pieces[rng.integers(len(pieces))], np.zeros(int(rng.uniform(0.3, 1.0) * 16000), np.float32)]
            n += len(parts[-2]) + len(parts[-1])
        audio = np.concatenate(parts)[: int(target)]
        path = folder / f"clip{i:02d}.flac"
        sf.write(path, audio, 16000)
        out.append((path, len(audio) / 16000))
    return out


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "whisperjax_cli.cli_serve", "-m", args.model, "--host", "127.0.0.1",
           "--port", str(port), "--max-queue", "256", "--batch-size", str(args.batch_size),
           "--request-timeout", "3600"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start")


def post(http: httpx.Client, path: Path, data: bytes | None = None) -> tuple[int, str, float]:
    """One transcription request; returns (status, text or error, latency in seconds)."""
    start = time.perf_counter()
    body = path.read_bytes() if data is None else data
    r = http.post("/v1/audio/transcriptions", files={"file": (path.name, body)},
                  data={"model": "whisper-1", "response_format": "json"})
    latency = time.perf_counter() - start
    return r.status_code, (r.json()["text"] if r.status_code == 200 else r.text), latency


def run_concurrent(url: str, batches: list[list[Path]]) -> tuple[float, list[tuple[int, str, float]]]:
    """Each client sends its list in order, all clients at once; returns (wall s, results in order)."""
    results: dict[Path, tuple[int, str, float]] = {}

    def client(paths: list[Path]) -> None:
        with httpx.Client(base_url=url, timeout=3600) as http:
            for p in paths:
                results[p] = post(http, p)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(batches)) as pool:
        list(pool.map(client, batches))
    wall = time.perf_counter() - start
    return wall, [results[p] for paths in batches for p in paths]


def run_sequential(url: str, paths: list[Path]) -> tuple[float, list[tuple[int, str, float]]]:
    start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=3600) as http:
        results = [post(http, p) for p in paths]
    return time.perf_counter() - start, results


def summary(name: str, wall: float, results, audio_seconds: float) -> str:
    latencies = sorted(r[2] for r in results)
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    failed = sum(r[0] != 200 for r in results)
    return (f"{name:<11} {len(results)} requests in {wall:6.1f} s: {len(results) / wall:.3f} req/s, "
            f"{audio_seconds / wall:5.1f} audio s/s, latency p50 {statistics.median(latencies):.1f} s "
            f"p95 {p95:.1f} s, failed {failed}")


class RssSampler(threading.Thread):
    """Samples a process's resident set size (VmRSS, MB) every ``period`` seconds."""

    def __init__(self, pid: int, period: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.period, self.samples, self.stop = pid, period, [], threading.Event()

    def rss(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(self.rss())
            self.stop.wait(self.period)


def throughput(args, url: str, clips: list[tuple[Path, float]]) -> None:
    paths = [p for p, _ in clips]
    audio = sum(s for _, s in clips)
    batches = [paths[i :: args.clients] for i in range(args.clients)]
    run_concurrent(url, batches)  # warm-up: every batch bucket
    run_sequential(url, paths[:1])
    ratios = []
    for k in range(args.passes):
        wall_c, res_c = run_concurrent(url, batches)
        wall_s, res_s = run_sequential(url, [p for b in batches for p in b])
        print(summary("concurrent", wall_c, res_c, audio))
        print(summary("one by one", wall_s, res_s, audio))
        same = sum(a[1] == b[1] for a, b in zip(res_c, res_s))
        ratios.append(wall_s / wall_c)
        print(f"pass {k + 1}: throughput x{ratios[-1]:.2f} concurrent over one at a time; "
              f"{same}/{len(res_c)} texts identical")
    print(f"throughput ratio over {args.passes} pass(es): mean x{statistics.mean(ratios):.2f}")


def soak(args, url: str, pid: int) -> None:
    with httpx.Client(base_url=url, timeout=600) as http:
        expected = {name: post(http, DATA / name)[1] for name in SHORT}
    rng = np.random.default_rng(args.seed)
    # (clip, None) or (a name, random bytes that are no audio format)
    plan = [(DATA / SHORT[rng.integers(len(SHORT))], rng.bytes(3000) if (i + 1) % args.bad_every == 0 else None)
            for i in range(args.soak)]
    sampler = RssSampler(pid)
    sampler.start()
    start = time.perf_counter()

    def client(k: int) -> list[str]:
        problems = []
        with httpx.Client(base_url=url, timeout=600) as http:
            for path, bad in plan[k :: args.clients]:
                status, text, _ = post(http, path, bad)
                if bad is not None and status != 400:
                    problems.append(f"bad upload got {status}")
                if bad is None and (status != 200 or text != expected[path.name]):
                    problems.append(f"{path.name}: {status} {text[:80]!r}")
        return problems

    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        problems = [p for ps in pool.map(client, range(args.clients)) for p in ps]
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    rss = sampler.samples
    bad = sum(b is not None for _, b in plan)
    print(f"soak: {len(plan)} requests ({bad} bad uploads) in {wall:.1f} s from {args.clients} clients; "
          f"failed good requests: {sum('bad upload' not in p for p in problems)}; "
          f"bad uploads not answered 400: {sum('bad upload' in p for p in problems)}")
    for p in problems[:10]:
        print("  ", p)
    print(f"server RSS MB over the soak ({len(rss)} samples): first {rss[0]:.0f}, last {rss[-1]:.0f}, "
          f"max {max(rss):.0f}")
    eighths = [max(part) for part in np.array_split(np.asarray(rss), 8) if len(part)]
    print("  largest in each eighth of the soak: " + " ".join(f"{v:.0f}" for v in eighths))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default=None, help="the server's --dtype (default: float32 on CPU)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=2)
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--soak", type=int, default=240)
    parser.add_argument("--bad-every", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--soak-only", action="store_true", help="skip the throughput phases")
    args = parser.parse_args()
    print(cpu_model())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        clips = make_clips(Path(tmp), args.clients * args.per_client, 30, 60, args.seed)
        print(f"{len(clips)} clips, {sum(s for _, s in clips):.0f} s of audio; model {args.model}, "
              f"batch size {args.batch_size}, dtype {args.dtype or 'default'}")
        proc = start_server(args, port)
        try:
            url = f"http://127.0.0.1:{port}"
            if not args.soak_only:
                throughput(args, url, clips)
            if args.soak:
                soak(args, url, proc.pid)
            proc.send_signal(signal.SIGTERM)
            print(f"server exit code after SIGTERM: {proc.wait(120)}")
        finally:
            if proc.poll() is None:
                proc.kill()
    print(cpu_model())
    return 0


if __name__ == "__main__":
    sys.exit(main())
