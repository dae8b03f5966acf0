"""Shared fixtures: real bundled models loaded once per session (compiles are shared too)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
CLIPS = sorted(p for p in DATA.iterdir() if p.suffix in (".flac", ".wav", ".mp3", ".ogg"))


@pytest.fixture(scope="session")
def tiny_en():
    from whisperjax_cli.models import load_model

    return load_model("tiny.en", dtype="float32")


@pytest.fixture(scope="session")
def base():
    from whisperjax_cli.models import load_model

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
