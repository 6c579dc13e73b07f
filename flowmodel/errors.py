"""The base of every error a user can fix (bad input, missing data, unreachable services): here,
because flowmodel's config errors are such errors and flowmodel imports nothing from pipeline."""

from __future__ import annotations


class FlowrayError(Exception):
    """`str(err)` says what was expected and what was found; `hint` (a class's, or the one
    passed) says what to try. The jobs print it as one line plus the hint, not a traceback, and
    exit with `exit_code` (a class's, or the one passed): 2, a usage error, unless a class that
    reports a runtime failure sets 1 (jobs.errors lists the codes)."""

    hint: str = ""
    exit_code: int = 2

    def __init__(self, message: str, hint: str = "", exit_code: int | None = None) -> None:
        super().__init__(message)
        if hint:
            self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code
