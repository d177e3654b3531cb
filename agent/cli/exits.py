"""Exit codes of ``livemig`` and the one error type the commands raise to end with one of them.

A script can rely on these: 0 only when the command did what it was asked
(for a migration waited on: completed *and* verified), 3 only when no agent
answered, so "retry later" and "this failed" are told apart.
"""
from __future__ import annotations

EXIT_OK = 0            # done; a migration waited on completed and was verified
EXIT_FAIL = 1          # the agent refused or failed it; a migration failed, was cancelled or is not verified
EXIT_USAGE = 2         # bad command line (argparse)
EXIT_UNREACHABLE = 3   # no agent answered on the control socket
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """exit codes:
  0  done; with --wait: the migration (every migration, for drain) completed and was verified
  1  failed: the agent refused the request, or a migration failed, was cancelled or is not verified
  2  usage error: unknown option, missing argument or bad value
  3  the agent could not be reached (no control socket, or nothing answering on it)"""


class CliError(Exception):
    """A user-facing failure: one line of text and the exit code it ends with."""

    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class UsageError(CliError):
    """The command line is wrong (raised by the parser instead of argparse's print-and-exit)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)
