"""Errors the user can fix. Every entry point catches `UserError` once (mentalglm/cli.py) and ends with one
`error: ...` line and exit code 2; anything else is a bug and keeps its traceback.

Each subclass is also a `ValueError`, so library callers that catch ValueError keep working.
"""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (a library's OSError can run to pages), else its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class UserError(ValueError):
    """A mistake in the configuration, the data or the files a user handed in, with what to do about it."""


class ConfigError(UserError):
    """A configuration value or combination that cannot run."""


class PredictionsError(UserError):
    """A bad row in a predictions file; the message names the file (or row source), line and field."""


class CheckpointError(UserError):
    """A checkpoint or adapter that cannot be used here (unreadable, unsafe, of another model or shape)."""


class NumericsError(UserError):
    """Training diverged (non-finite losses or weights); the message names the remedies."""


class OutputError(UserError):
    """An output directory that cannot be written (read-only, full, in use by another run)."""
