"""Exceptions that the CLI maps to exit codes and one-line messages.

Each error carries the thing it is about (a file, a model) so that the message reads
``<subject>: <what went wrong>`` without a traceback.
"""

from __future__ import annotations


class WjxError(Exception):
    """Base class: ``str(err)`` is ``"<subject>: <message>"`` (or just the message)."""

    def __init__(self, subject: str | None, message: str):
        self.subject = None if subject is None else str(subject)
        self.message = message
        super().__init__(f"{self.subject}: {message}" if self.subject else message)


class AudioError(WjxError):
    """An input could not be read or decoded as audio (exit code 1, per file)."""


class ModelError(WjxError):
    """A model could not be found, read or validated (exit code 3)."""


class UsageError(WjxError):
    """A bad option value detected by the library, e.g. an unknown language (exit code 2)."""
