"""wjx: Whisper transcription and audio classification on JAX/Flax.

The heavy modules (JAX, Flax) are imported lazily so that ``wjx --help`` stays instant.
"""

from __future__ import annotations

__version__ = "0.1.0"

# Public name -> module defining it. No public name is also a submodule's name: importing a
# submodule sets it as an attribute of the package, which would hide the function.
_LAZY = {
    "load_model": "whisperjax_cli.loading",
    "transcribe": "whisperjax_cli.longform",
    "transcribe_files": "whisperjax_cli.longform",
    "Transcriber": "whisperjax_cli.longform",
    "Cancelled": "whisperjax_cli.longform",
    "TranscribeOptions": "whisperjax_cli.options",
    "load_audio": "whisperjax_cli.audio",
    "log_mel_spectrogram": "whisperjax_cli.features",
    "detect_language": "whisperjax_cli.language",
    "classify": "whisperjax_cli.classifier",
    "load_classify_model": "whisperjax_cli.classifier",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'whisperjax_cli' has no attribute {name!r}")
