"""User-facing errors.

Anything the user can fix (a bad config key, a missing file, a malformed row) raises `UserError`. The CLI prints its
message as one line on stderr and exits with code 2; the traceback is shown only with `--debug`.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, reported as one clear line (exit code 2)."""

    exit_code = 2

    def __init__(self, message: str, details: list[str] | None = None):
        super().__init__(message)
        self.message = message
        # Extra lines (e.g. the first bad rows of a dataset) printed after the message.
        self.details = details or []

    def __str__(self) -> str:
        return self.message


class ConfigError(UserError):
    """An invalid configuration: unknown key, wrong type, bad value."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived during training: a checkpoint was saved and training stopped."""

    def __init__(self, step: int, checkpoint, signum: int):
        super().__init__(f"interrupted at step {step}; checkpoint saved to {checkpoint}; run again to resume")
        self.exit_code = 128 + signum
