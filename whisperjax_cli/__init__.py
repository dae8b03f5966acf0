"""wjx: Whisper transcription and audio classification on JAX/Flax.

The heavy modules (JAX, Flax) are imported lazily so that ``wjx --help`` stays instant.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_model": "whisperjax_cli.models",
    "transcribe": "whisperjax_cli.transcribe",
    "load_audio": "whisperjax_cli.audio",
    "log_mel_spectrogram": "whisperjax_cli.features",
    "detect_language": "whisperjax_cli.classify",
    "classify": "whisperjax_cli.classify",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'whisperjax_cli' has no attribute {name!r}")
