"""Errors that the CLI turns into one clear message and a meaningful exit code.

Exit codes (as in simonw/llm): 0 done, 1 runtime failure, 2 usage or data error; stopped by a signal:
130 (Ctrl-C, SIGINT) and 143 (SIGTERM), the 128 + signal number that shells report (`Stopped.exit_code`).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT


class Stopped(KeyboardInterrupt):
    """A command was stopped by a signal (SIGINT or SIGTERM).

    A KeyboardInterrupt on purpose: every cleanup written for Ctrl-C (temporary files removed, resume state kept)
    then runs for SIGTERM too, and no `except Exception` can swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum


class SlapError(Exception):
    """A failure the user can act on; printed without a traceback."""

    exit_code = EXIT_FAILURE


class UsageError(SlapError):
    """Bad options or paths: exit code 2."""

    exit_code = EXIT_USAGE


class DataError(SlapError):
    """Bad input data. The message names the file, the line and the field when they are known."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, path: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.reason = message
        self.path = path
        self.line = line
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        where = ""
        if self.path is not None:
            where = self.path if self.line is None else f"{self.path}:{self.line}"
        parts = [p for p in (where, f"field '{self.field}'" if self.field else "") if p]
        return (": ".join(parts) + ": " if parts else "") + self.reason


class StaleArtifactError(DataError):
    """An artifact was made from other data than the one it is used with."""


class MissingDependencyError(SlapError):
    """An optional package is not installed; the message carries the exact install command."""

    exit_code = EXIT_FAILURE
