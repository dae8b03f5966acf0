"""Bad input never breaks wjx: each case gets its documented exit code and one line naming the
file and the problem, within seconds and bounded memory, and leaves no partial file behind.

The cases are those of the round-2 review (shared/reference/round2-findings.md), run as a user
runs them: ``python -m whisperjax_cli`` in a real process, so exit codes, signals, stdout pipes
and peak memory (the child's ru_maxrss) are the process's own.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import soundfile as sf

DATA = Path(__file__).parent / "data"
GO = DATA / "goforward.flac"  # " Go forward 10 meters."
SOMETHING = DATA / "something.wav"
PEAK_LIMIT_MB = 1500


# Runs wjx as a child and reports the child's peak RSS (ru_maxrss, KB) on a last stderr line.
_PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
         "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
         "sys.exit(r.returncode)")


SHARED = {}  # the module's compile cache folder: programs compiled once for all its processes


@pytest.fixture(scope="module", autouse=True)
def shared_cache(tmp_path_factory):
    SHARED["cache"] = tmp_path_factory.mktemp("cache")
    yield
    SHARED.clear()


def wjx(*args, cwd: Path, timeout: float = 120, env: dict | None = None, cache: Path | None = None):
    """Runs ``wjx`` in a fresh process; returns (CompletedProcess, seconds, peak RSS in MB)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("WJX_", "JAX_", "XLA_"))}
    full_env.update({"WJX_CACHE_DIR": str(cache or SHARED["cache"]), **(env or {})})
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PEAK, sys.executable, "-m", "whisperjax_cli", *map(str, args)],
                          cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    *lines, last = proc.stderr.splitlines(keepends=True)
    assert last.startswith("PEAK_KB "), proc.stderr
    peak = int(last.split()[1]) / 1024
    assert peak < PEAK_LIMIT_MB, f"peak RSS {peak:.0f} MB"
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, "".join(lines)), seconds, peak


def one_line(stderr: str, *fragments: str) -> str:
    lines = [line for line in stderr.splitlines() if " written to " not in line]
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith("."))


# ---------------------------------------------------------------- model files (exit 3)


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory) -> Path:
    """tiny.en converted once into an HF folder (config.json + model.safetensors)."""
    folder = tmp_path_factory.mktemp("models") / "tiny-hf"
    proc, _, _ = wjx("models", "convert", "tiny.en", folder, cwd=folder.parent)
    assert proc.returncode == 0, proc.stderr
    return folder


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_config_with_a_million_layers_exits_3_at_once(hf_tiny, tmp_path):
    model = _copy_model(hf_tiny, tmp_path / "huge")
    config = json.loads((model / "config.json").read_text())
    config.update(encoder_layers=10**6, decoder_layers=10**6)
    (model / "config.json").write_text(json.dumps(config))
    for args in (("transcribe", "-m", model, "-o", tmp_path, GO), ("models", "convert", model, tmp_path / "m2")):
        proc, seconds, _ = wjx(*args, cwd=tmp_path)
        assert proc.returncode == 3, proc.stderr
        one_line(proc.stderr, "config.json", "encoder_layers must be a whole number from 1 to 256")
        assert seconds < 20  # the JAX import included; the check itself allocates nothing
    assert not (tmp_path / "m2").exists() and not list(tmp_path.glob("*.txt"))


@pytest.mark.parametrize("case", ["list-config", "string-dims", "msgpack-tree", "json-bomb"])
def test_malformed_model_files_exit_3_with_one_line(hf_tiny, tmp_path, case):
    model = _copy_model(hf_tiny, tmp_path / "bad")
    if case == "list-config":
        (model / "config.json").write_text("[1, 2, 3]")
        want = "must hold a JSON object"
    elif case == "string-dims":
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "d_model": "384"}))
        want = "d_model must be a whole number from 1 to 8192, not '384'"
    elif case == "msgpack-tree":
        (model / "model.safetensors").unlink()
        (model / "flax_model.msgpack").write_bytes(msgpack.packb({"a": [1, 2, {"b": b"xx"}]}))
        want = "not a Flax parameter tree"
    else:
        (model / "config.json").write_text("[" * 100_000 + "]" * 100_000)
        want = "invalid JSON"
    proc, _, _ = wjx("transcribe", "-m", model, "-o", tmp_path, GO, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    one_line(proc.stderr, want)


# ---------------------------------------------------------------- audio (exit 1, the others still written)


def test_absurd_header_and_non_finite_samples_fail_alone(tmp_path):
    """A WAV whose header says 1 Hz (13 h of audio from 96 KB) is refused at once with bounded
    memory; float samples holding NaN or infinity are a per-file error; the good file is written."""
    header = bytearray(SOMETHING.read_bytes())
    header[24:28] = (1).to_bytes(4, "little")  # the sample rate field of the fmt chunk
    (tmp_path / "sr1.wav").write_bytes(bytes(header))
    samples, rate = sf.read(SOMETHING, dtype="float32")
    samples[::100], samples[50::100] = np.nan, np.inf
    sf.write(tmp_path / "nan.wav", samples, rate, subtype="FLOAT")
    shutil.copy(GO, tmp_path / "go.flac")
    proc, seconds, _ = wjx("transcribe", "-o", tmp_path / "out", "sr1.wav", "nan.wav", "go.flac", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    errors = sorted(line for line in proc.stderr.splitlines() if " written to " not in line)
    assert errors == [
        "wjx: nan.wav: contains non-finite samples (NaN or infinity)",
        "wjx: sr1.wav: implausible sample rate 1 Hz in its header (expected 1000-768000): corrupt header?",
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["go.txt"]
    assert (tmp_path / "out" / "go.txt").read_text() == "Go forward 10 meters.\n"
    assert seconds < 60
    assert "RuntimeWarning" not in proc.stderr


def test_file_name_with_a_newline_is_one_escaped_line(tmp_path):
    name = "bad\nline.wav"
    (tmp_path / name).write_bytes(os.urandom(4000))
    proc, _, _ = wjx("transcribe", "-o", tmp_path, name, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    line = one_line(proc.stderr, "bad\\nline.wav: ")
    assert line.startswith("wjx: bad\\nline.wav: ")


# ---------------------------------------------------------------- usage errors (exit 2)


@pytest.mark.parametrize("flags, fragment", [
    (["--temperature", "nan"], "--temperature: must be a number from 0 to 1, not nan"),
    (["--beam-size", "2", "--patience", "-1"], "--patience: must be > 0.0, not -1.0"),
    (["--patience", "2"], "--patience: needs --beam-size"),
    (["--length-penalty", "inf"], "--length-penalty: must be a finite number"),
    (["--no-speech-threshold", "1.5"], "--no-speech-threshold: must be <= 1.0"),
    (["--compression-ratio-threshold", "nan"], "--compression-ratio-threshold: must be a finite number"),
])
def test_bad_option_values_are_usage_errors(tmp_path, flags, fragment):
    proc, seconds, _ = wjx("transcribe", *flags, GO, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    one_line(proc.stderr, fragment)
    assert seconds < 10 and not list(tmp_path.glob("*.txt"))


# ---------------------------------------------------------------- signals, pipes, permissions, the cache


def test_sigterm_and_sighup_leave_no_partial_outputs(tmp_path):
    """Terminated while writing (each run is signalled as soon as its first output appears):
    exit 128 + the signal, every output either whole or absent, no temporary file."""
    inputs = []
    for i in range(8):
        inputs.append(tmp_path / f"clip{i}.flac")
        shutil.copy(GO if i % 2 else DATA / "cards-005.flac", inputs[-1])
    for sig in (signal.SIGTERM, signal.SIGHUP):
        out = tmp_path / f"out-{sig.name}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WJX_", "JAX_", "XLA_"))}
        env["WJX_CACHE_DIR"] = str(SHARED["cache"])
        proc = subprocess.Popen([sys.executable, "-m", "whisperjax_cli", "transcribe", "-f", "all", "--batch-size",
                                 "1", "-o", out, *inputs], env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (out.exists() and any(out.iterdir())):
            time.sleep(0.005)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig, err
        assert err.strip().endswith(f"wjx: terminated ({sig.name})"), err
        assert leftovers(out) == []
        for path in out.iterdir():
            assert path.stat().st_size > 0 and path.suffix in (".txt", ".srt", ".vtt", ".tsv", ".json")
            if path.suffix == ".json":
                json.loads(path.read_text())  # whole


@pytest.mark.parametrize("moment", ["created", "written"])
def test_a_signal_at_the_worst_moment_leaves_no_temporary_file(tmp_path, monkeypatch, moment):
    """The race the process test above can lose only by chance (CI did once): SIGTERM delivered
    the instant a temporary output exists, before the writer has recorded it, or mid-write."""
    from whisperjax_cli import writers
    from whisperjax_cli.interrupts import Terminated, forget_signals, handle_termination
    from whisperjax_cli.results import Segment, Transcript

    real_open, real_fdopen = os.open, os.fdopen

    def open_then_signal(*args, **kwargs):
        fd = real_open(*args, **kwargs)
        if moment == "created":
            signal.raise_signal(signal.SIGTERM)  # its handler runs before this call returns
        return fd

    def fdopen_then_signal(*args, **kwargs):
        if moment == "written":
            signal.raise_signal(signal.SIGTERM)
        return real_fdopen(*args, **kwargs)

    monkeypatch.setattr(writers.os, "open", open_then_signal)
    monkeypatch.setattr(writers.os, "fdopen", fdopen_then_signal)
    previous = handle_termination()
    try:
        segment = Segment(id=0, seek=0, start=0.0, end=1.0, text=" Go.", tokens=[], temperature=0.0,
                          avg_logprob=-0.1, compression_ratio=1.0, no_speech_prob=0.01)
        transcript = Transcript(text=" Go.", segments=[segment], language="en", language_probability=1.0,
                                duration=1.0)
        with pytest.raises(Terminated):
            writers.write_transcript(transcript, tmp_path, "clip", ["all"])
        with pytest.raises(Terminated):
            writers.write_atomic(tmp_path / "clip.json", "{}")
        monkeypatch.undo()
        writers.write_atomic(tmp_path / "after.json", "{}")  # a signal once held is not raised again
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        forget_signals()
    assert sorted(os.listdir(tmp_path)) == ["after.json"]


def test_closed_stdout_ends_quietly(tmp_path):
    shutil.copy(GO, tmp_path / "a.flac")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WJX_", "JAX_", "XLA_"))}
    env["WJX_CACHE_DIR"] = str(SHARED["cache"])
    cmd = f"set -o pipefail; {sys.executable} -m whisperjax_cli transcribe a.flac a.flac a.flac -f json -o - | true"
    proc = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 141), proc.stderr  # 0 when everything was written before `true` ended
    assert [line for line in proc.stderr.splitlines() if " written to " not in line] == []


def test_planted_cache_entries_are_never_unpickled(tmp_path):
    """Every file in the compile cache replaced by a pickle that would write a marker: the next
    run ignores them (recompiles), gives the same text, and the marker never appears."""
    shutil.copy(GO, tmp_path / "a.flac")
    first, _, _ = wjx("transcribe", "a.flac", "-o", "-", cwd=tmp_path, cache=tmp_path / "cache")
    assert first.returncode == 0 and first.stdout == "Go forward 10 meters.\n"
    marker = tmp_path / "MARKER"

    class Planted:
        def __reduce__(self):
            return (Path.write_text, (marker, "unpickled"))

    entries = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert entries
    for path in entries:
        path.write_bytes(pickle.dumps(Planted()))
    again, _, _ = wjx("transcribe", "a.flac", "-o", "-", cwd=tmp_path, cache=tmp_path / "cache")
    assert not marker.exists()
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout


def test_saved_models_get_normal_permissions(hf_tiny, tmp_path):
    old = os.umask(0o022)
    try:
        proc, _, _ = wjx("models", "convert", hf_tiny, tmp_path / "copy", cwd=tmp_path)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "copy").stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "copy").iterdir()} == {0o644}


def test_a_playlist_cannot_make_ffmpeg_read_other_files(tmp_path):
    """An HLS playlist naming a local file (an upload to a server, a file from elsewhere) is not
    followed: ffmpeg runs with only file/pipe protocols and single-stream containers."""
    from whisperjax_cli.audio import load_audio
    from whisperjax_cli.errors import AudioError

    playlist = tmp_path / "list.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:3,\n{GO}\n#EXT-X-ENDLIST\n")
    with pytest.raises(AudioError) as err:
        load_audio(str(playlist))
    assert str(err.value).startswith(str(playlist))
    if shutil.which("ffmpeg") is None:
        assert "install ffmpeg" in str(err.value)
    else:
        assert "ffmpeg cannot decode it" in str(err.value)
        m4a = tmp_path / "a.m4a"  # while the containers users have still decode
        subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(GO), "-c:a", "aac", str(m4a)], check=True)
        assert abs(len(load_audio(str(m4a))) - len(load_audio(str(GO)))) < 2048
