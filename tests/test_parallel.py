"""Many devices and many processes: a batch spread over 4 devices decodes as on one device; two
processes on loopback write every file once, as one process does, and share one exit code.

XLA reads ``--xla_force_host_platform_device_count`` once, when JAX starts, so the runs on
several devices are subprocesses; this process computes the one-device references meanwhile
(XLA compiles on one core: the two overlap on a 2-core machine).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA

CLIPS = ("cards-001.flac", "cards-005.flac", "goforward.flac", "something.wav")
TIMEOUT = 420  # seconds a subprocess may take (a loaded 2-core machine); a hang fails the test


# ---------------------------------------------------------------- dealing, sizes, flags (no JAX programs)


def test_deal_balances_audio_and_every_process_computes_the_same_split():
    from whisperjax_cli.parallel_hosts import deal

    durations = [60.0, 10.0, 50.0, 20.0, 30.0, 40.0]
    shares = deal(durations, 2)
    assert shares == deal(list(durations), 2)
    assert sorted(i for s in shares for i in s) == list(range(6))  # each input once
    assert shares == [[0, 3, 4], [1, 2, 5]]  # 110 s and 100 s (a round robin in input order gives 140 / 70)
    assert deal(durations, 1) == [list(range(6))]
    assert deal([5.0], 3) == [[0], [], []]


def test_deal_counts_unknown_durations_as_the_mean_of_the_known():
    from whisperjax_cli.parallel_hosts import deal

    # None counts as 20 s, the mean: 40 + 0 against 20 + 20.
    assert deal([40.0, None, 20.0, 0.0], 2) == [[0, 3], [1, 2]]
    assert deal([None, None, None], 2) == [[0, 2], [1]]  # nothing known: equal weights, lower id first


def test_audio_seconds_read_from_headers(tmp_path):
    from whisperjax_cli.parallel_hosts import audio_seconds

    assert audio_seconds(DATA / "cards-001.flac") == pytest.approx(1.095375)
    assert audio_seconds(DATA / "russian-8k.wav") == pytest.approx(9.375)
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    assert audio_seconds(bad) is None and audio_seconds(None) is None


def test_batch_buckets_are_multiples_of_the_device_count():
    from whisperjax_cli.window_decoder import batch_bucket

    assert [batch_bucket(n) for n in (1, 3, 5, 64, 70)] == [1, 4, 8, 64, 70]  # one device: as before
    assert [batch_bucket(n, 4) for n in (1, 2, 4, 5, 9, 70)] == [4, 4, 4, 8, 16, 72]
    assert [batch_bucket(n, 3) for n in (1, 2, 3, 5)] == [3, 3, 6, 9]


class FakeDevice:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_default_batch_size_from_device_memory():
    from whisperjax_cli.dims import OFFICIAL_DIMS
    from whisperjax_cli.parallel import CPU_PER_DEVICE, MAX_PER_DEVICE, default_batch_size, window_bytes

    large = OFFICIAL_DIMS["large-v3"]
    per_window = window_bytes(large, 2)
    assert 300e6 < per_window < 400e6  # audio keys/values 246 MB + decoder buffers, bfloat16
    h100 = FakeDevice({"bytes_limit": 80 * 2**30, "bytes_in_use": 3 * 2**30})
    assert default_batch_size(h100, large, 2) == 64  # 41 GB / 0.36 GB = 113 -> 64
    assert default_batch_size(FakeDevice({"bytes_limit": 16 * 2**30, "bytes_in_use": 3 * 2**30}), large, 2) == 16
    assert default_batch_size(h100, large, 2, rows_per_window=5) == 32  # beams hold 5 decoder rows each
    assert default_batch_size(h100, OFFICIAL_DIMS["tiny"], 2) == MAX_PER_DEVICE
    assert default_batch_size(FakeDevice(None), large) == CPU_PER_DEVICE  # CPUs report no limit
    assert default_batch_size(FakeDevice({"bytes_limit": 2**30, "bytes_in_use": 2**30}), large) == 1


def test_param_spec_splits_only_large_parameters_along_a_divisible_axis():
    from jax.sharding import PartitionSpec as P

    from whisperjax_cli.parallel import MODEL, param_spec

    assert param_spec((51866, 1280), 2, 2) == P(MODEL)  # the embedding: its longest axis
    assert param_spec((1280, 5120), 2, 4) == P(None, MODEL)
    assert param_spec((51865, 1280), 2, 2) == P(None, MODEL)  # an odd vocabulary: the other axis
    assert param_spec((1280,), 2, 2) == P()  # biases and norms stay whole
    assert param_spec((1280, 5120), 2, 1) == P()  # no model axis


def test_distributed_request_from_flags_and_environment():
    from whisperjax_cli.errors import UsageError
    from whisperjax_cli.parallel_hosts import DistributedRequest, detected_cluster, distributed_request

    assert distributed_request(None, None, None, None, environ={}) is None
    assert distributed_request("10.0.0.1:1234", 4, 3, None, environ={}) == DistributedRequest("10.0.0.1:1234", 4, 3)
    assert distributed_request(None, None, None, True, environ={}) == DistributedRequest()
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "1"}
    assert detected_cluster(slurm) == "SLURM"
    assert distributed_request(None, None, None, None, environ=slurm) == DistributedRequest()
    assert distributed_request(None, None, None, False, environ=slurm) is None  # --no-distributed
    assert detected_cluster({**slurm, "SLURM_NTASKS": "1"}) is None  # one task of an allocation
    assert detected_cluster({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"}) == "Open MPI"
    assert detected_cluster({"TPU_WORKER_HOSTNAMES": "w0,w1"}) == "TPU pod"
    assert detected_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    for bad in [("h:1", 2, None), ("nohost", 2, 0), ("h:1", 2, 2)]:
        with pytest.raises(UsageError):
            distributed_request(*bad, None, environ={})


# ---------------------------------------------------------------- 4 devices decode as one


def segments(model, mode: str = "sequential") -> list:
    """``[start, end, text, tokens, avg_logprob, no_speech_prob]`` of every segment of the
    clips, per clip, decoded 4 windows at a time at temperature 0."""
    from whisperjax_cli.longform import transcribe_files

    events = transcribe_files(model, [DATA / c for c in CLIPS], mode=mode, batch_size=4, temperature=0.0)
    return [[[s.start, s.end, s.text, s.tokens, s.avg_logprob, s.no_speech_prob] for s in e.transcript.segments]
            for e in events if e.transcript is not None]


def decode_all(model) -> dict:
    """What the 4-device comparison checks, for one placement of ``model``: :func:`segments` in
    sequential and batched mode, and raw window results of sampling with best-of and of beam
    search (the other two decode paths)."""
    import jax

    from whisperjax_cli.audio import load_audio
    from whisperjax_cli.features import LogMelWindows, model_window
    from whisperjax_cli.options import TranscribeOptions
    from whisperjax_cli.window_decoder import WindowDecoder

    from whisperjax_cli.longform import transcribe_files

    paths = [DATA / c for c in CLIPS]
    out = {mode: segments(model, mode) for mode in ("sequential", "batched")}
    # word timing reads the decode's audio keys/values, which are spread over the devices too
    events = transcribe_files(model, paths, mode="batched", batch_size=4, temperature=0.0, word_timestamps=True)
    out["words"] = [[[w.word, w.start, w.end, w.probability] for s in e.transcript.segments for w in s.words]
                    for e in events]
    mels = np.stack([model_window(LogMelWindows(load_audio(p), model.n_mels, padding=480000), 0, 3000)
                     for p in paths[:3]])
    tok = model.tokenizer
    for name, options in [("sampled", TranscribeOptions(temperature=0.7, best_of=2)),
                          ("beam", TranscribeOptions(temperature=0.0, beam_size=2))]:
        decoder = WindowDecoder(model, options)
        results = decoder.decode(decoder.encode(mels), 3, [list(tok.sot_sequence)] * 3, len(tok.sot_sequence),
                                 jax.random.PRNGKey(1))
        out[name] = [[r.tokens, r.sum_logprob] for r in results]
    return out


def four_devices_main() -> None:
    """The subprocess: :func:`decode_all` on a mesh of 4 CPU devices, how many programs a
    second sequential run compiled (none: shardings are stable), and sequential :func:`segments`
    with the parameters split in two (a 2 x 2 mesh), as JSON on stdout."""
    import jax

    from whisperjax_cli.decoding import decode_window
    from whisperjax_cli.loading import load_model
    from whisperjax_cli.longform import transcribe_files
    from whisperjax_cli.parallel import _decode_spread, _encode_spread, place_model, placement_of

    assert len(jax.devices()) == 4
    loaded = load_model("tiny.en", dtype="float32")
    model = place_model(loaded, jax.devices())
    assert placement_of(model.params).size == 4
    out = decode_all(model)
    jitted = (_encode_spread, _decode_spread, decode_window)
    before = [f._cache_size() for f in jitted]
    list(transcribe_files(model, [DATA / c for c in reversed(CLIPS)], batch_size=4, temperature=0.0))
    out["programs"] = [before, [f._cache_size() for f in jitted]]
    split = place_model(loaded, jax.devices(), model_axis=2)
    assert placement_of(split.params).params_split and placement_of(split.params).size == 2
    out["split"] = segments(split)
    print(json.dumps(out))


def subprocess_env(devices: int, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WJX_MODEL", "JAX_PLATFORMS", "WJX_NO_COMPILE_CACHE")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               WJX_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(Path(__file__).parent))
    return env


def assert_same_segments(one: list, many: list) -> None:
    """Same files, segments, times, texts and tokens; log probabilities equal but for the last
    float digits, which on one device already depend on the batch size a row ran in."""
    assert len(one) == len(many)
    for a_file, b_file in zip(one, many):
        assert [s[:4] for s in a_file] == [s[:4] for s in b_file]
        np.testing.assert_allclose([s[4:] for s in a_file], [s[4:] for s in b_file], rtol=1e-4, atol=1e-5)


def test_four_devices_decode_as_one_device(tiny_en, tmp_path):
    run = subprocess.Popen([sys.executable, "-c", "import test_parallel as t; t.four_devices_main()"],
                           env=subprocess_env(4, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    one = decode_all(tiny_en)
    stdout, stderr = run.communicate(timeout=TIMEOUT)
    assert run.returncode == 0, stderr[-3000:]
    many = json.loads(stdout.strip().splitlines()[-1])
    for mode in ("sequential", "batched"):
        assert_same_segments(one[mode], many[mode])
    assert_same_segments(one["sequential"], many["split"])  # sums split over 2 devices: rounding alone
    assert [[w[0] for w in f] for f in one["words"]] == [[w[0] for w in f] for f in many["words"]]
    assert sum(len(f) for f in one["words"]) > 10
    np.testing.assert_allclose([w[1:] for f in one["words"] for w in f], [w[1:] for f in many["words"] for w in f],
                               atol=1e-4)
    for name in ("sampled", "beam"):
        assert [r[0] for r in one[name]] == [r[0] for r in many[name]], name
        np.testing.assert_allclose([r[1] for r in one[name]], [r[1] for r in many[name]], rtol=1e-4)
    assert [" ".join(s[2] for s in f).strip() for f in one["sequential"]][:2] == [
        "10 of clubs.", "8 of spades, 4 of close, 7 of hearts."]
    before, after = many["programs"]
    assert before == after and before[0] >= 1 and before[1] >= 1  # spread programs ran, none recompiled


# ---------------------------------------------------------------- two processes, one run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wjx_transcribe(args: list, env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "whisperjax_cli", "transcribe", *map(str, args)], env=env,
                            cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(runs: list) -> list[tuple[int, str]]:
    """``(exit code, stderr)`` of each run, which wrote nothing on stdout (results go to files);
    a run past :data:`TIMEOUT` is killed and fails the test."""
    done = []
    for run in runs:
        try:
            stdout, stderr = run.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for r in runs:
                r.kill()
            pytest.fail("a wjx process did not finish in time")
        assert stdout == "", stdout
        done.append((run.returncode, stderr))
    return done


def decoded(stderr: str) -> list[str]:
    """The inputs whose segments a verbose run printed (``folder/name: [..] text``)."""
    return sorted({line.split(": [", 1)[0] for line in stderr.splitlines() if ": [" in line})


def two_process_run(folder: str, out: str, env: dict, cwd: Path, *extra) -> list[tuple[int, str]]:
    port = free_port()
    flags = ["-o", out, "-f", "txt", "-f", "json", "--batch-size", "2", "--temperature-increment-on-fallback", "0",
             "-v", "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2, *extra]
    return finish([wjx_transcribe([folder, *flags, "--process-id", i], env, cwd) for i in (0, 1)])


def test_two_processes_write_every_file_once_as_one_process(tmp_path):
    """7 clips and a file that is not audio: the one-process run and the two-process run (2
    devices each) write the same 7 outputs and exit 1 (every process); each file is decoded
    by one process only; a rerun with --skip-existing decodes only what is missing."""
    folder = tmp_path / "in"
    folder.mkdir()
    clips = ["cards-001.flac", "cards-002.flac", "cards-003.flac", "cards-004.flac", "cards-005.flac",
             "goforward.flac", "something.wav"]
    for name in clips:
        (folder / name).write_bytes((DATA / name).read_bytes())
    (folder / "broken.wav").write_text("not audio")
    env = subprocess_env(2, tmp_path)
    common = ["-f", "txt", "-f", "json", "--batch-size", "2", "--temperature-increment-on-fallback", "0"]
    alone = wjx_transcribe(["in", "-o", "one", *common], subprocess_env(1, tmp_path), tmp_path)
    (code0, err0), (code1, err1) = two_process_run("in", "two", env, tmp_path)
    [(code, err)] = finish([alone])
    assert (code, code0, code1) == (1, 1, 1), (err, err0, err1)
    stems = sorted(Path(c).stem for c in clips)
    for out in ("one", "two"):
        assert sorted(p.stem for p in (tmp_path / out).glob("*.json")) == stems
    for stem in stems:
        assert (tmp_path / "one" / f"{stem}.txt").read_text() == (tmp_path / "two" / f"{stem}.txt").read_text()
        one = json.loads((tmp_path / "one" / f"{stem}.json").read_text())["segments"]
        two = json.loads((tmp_path / "two" / f"{stem}.json").read_text())["segments"]
        assert [(s["start"], s["end"], s["text"], s["tokens"]) for s in one] == [
            (s["start"], s["end"], s["text"], s["tokens"]) for s in two]
    by0, by1 = decoded(err0), decoded(err1)
    assert not set(by0) & set(by1) and sorted(by0 + by1) == [f"in/{c}" for c in sorted(clips)], (by0, by1)
    assert 3 <= len(by0) <= 4  # balanced by duration
    failures = [line for line in (err0 + err1).splitlines() if line.startswith("wjx: in/broken.wav: ")]
    assert len(failures) == 1  # reported by the process it was dealt to
    assert "7 written to two by 2 processes, 1 failed" in err0 and "written to" not in err1
    for suffix in (".txt", ".json"):
        (tmp_path / "two" / f"cards-003{suffix}").unlink()
    (code0, err0), (code1, err1) = two_process_run("in", "two", env, tmp_path, "--skip-existing")
    assert (code0, code1) == (1, 1), (err0, err1)  # the broken file is still broken
    segments = [line for line in (err0 + err1).splitlines() if " --> " in line]
    assert len(segments) == 1 and segments[0].endswith("7 of clubs."), (err0, err1)  # one input: no name
    assert (err0 + err1).count("skipped, its outputs exist") == 6
    assert (tmp_path / "two" / "cards-003.txt").read_text() == (tmp_path / "one" / "cards-003.txt").read_text()
