"""The base of every error a user can fix (bad input, missing data, unreachable services): here,
because flowmodel's config errors are such errors and flowmodel imports nothing from pipeline."""

from __future__ import annotations


class FlowrayError(Exception):
    """`str(err)` says what was expected and what was found; `hint` (a class's, or the one
    passed) says what to try. The jobs print it as one line plus the hint, not a traceback."""

    hint: str = ""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint
