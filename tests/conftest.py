"""Shared fixtures: real bundled models loaded once per session (compiles are shared too)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
CLIPS = sorted(p for p in DATA.iterdir() if p.suffix in (".flac", ".wav", ".mp3", ".ogg"))


@pytest.fixture(scope="session")
def tiny_en():
    from whisperjax_cli.loading import load_model

    return load_model("tiny.en", dtype="float32")


@pytest.fixture(scope="session")
def base():
    from whisperjax_cli.loading import load_model

    return load_model("base", dtype="float32")


@pytest.fixture(scope="session")
def clip_audio():
    """Every dev clip decoded once by our loader: the same arrays go to both implementations."""
    from whisperjax_cli.audio import load_audio

    return {p.name: load_audio(p) for p in CLIPS}


def faster_whisper_model(model):
    """faster-whisper on the same CTranslate2 files as ``model``, float32, 2 threads."""
    from faster_whisper import WhisperModel

    return WhisperModel(str(model.path), device="cpu", compute_type="float32", cpu_threads=os.cpu_count() or 2)


# ---------------------------------------------------------------- the CLI in-process (test_cli*)


SUMMARY = re.compile(r"^wjx: \d+ written to .*real time$|^wjx: \d+ written to .* of audio in [\d.]+ s$")


class CliResult:
    """click's Result, with ``stderr`` lacking the run's closing summary line (most tests check
    stderr exactly); ``summary`` holds that line (or None) and ``full_stderr`` everything."""

    def __init__(self, result):
        self._result = result
        lines = result.stderr.splitlines(keepends=True)
        kept = [line for line in lines if not SUMMARY.match(line.rstrip("\n"))]
        self.summary = next((line.rstrip("\n") for line in lines if SUMMARY.match(line.rstrip("\n"))), None)
        self.stderr = "".join(kept)
        self.full_stderr = result.stderr

    def __getattr__(self, name):
        return getattr(self._result, name)


def hide_ffmpeg(monkeypatch):
    """PATH without the folders holding an ``ffmpeg``: a machine without it."""
    import shutil

    folders = os.environ.get("PATH", "").split(os.pathsep)
    kept = [f for f in folders if not (f and shutil.which("ffmpeg", path=f))]
    monkeypatch.setenv("PATH", os.pathsep.join(kept))
    assert shutil.which("ffmpeg") is None


def cli_invoker(monkeypatch, tmp_path):
    """Prepares an in-process ``wjx`` run in ``tmp_path`` (no persistent compile cache, no
    ``WJX_MODEL``) and returns ``invoke(*args, input=None) -> click Result``; exceptions other
    than SystemExit propagate, so a crash is a test error rather than an exit code."""
    from click.testing import CliRunner

    from whisperjax_cli.cli import cli

    monkeypatch.setenv("WJX_NO_COMPILE_CACHE", "1")
    monkeypatch.delenv("WJX_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)

    def invoke(*args, input=None):
        result = CliRunner().invoke(cli, [str(a) for a in args], input=input)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return CliResult(result)

    return invoke


def no_model(monkeypatch):
    """Makes loading a model fail the test: the command must stop before it."""
    from whisperjax_cli import loading

    def refuse(*_, **__):
        raise AssertionError("the model should not be loaded")

    monkeypatch.setattr(loading, "load_model", refuse)
