"""Exceptions that map one-to-one onto the CLI's documented exit codes.

Anything the user can fix (a bad file, a bad flag, an unwritable path) is a ``UserError`` and
exits 2 with a one-line message; a model that cannot be proven correct is a
``VerificationFailed`` and exits 1. Any other exception is a bug in this project.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_VERIFICATION_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL_ERROR = 3  # a bug in this project, never the user's fault


class UserError(Exception):
    """Bad input or usage; the message is shown to the user as one line (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class VerificationFailed(Exception):
    """The optimized model breaks the parity or speed budget (exit 1); the report says where."""

    exit_code = EXIT_VERIFICATION_FAILED
