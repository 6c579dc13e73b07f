"""The base of every error a user can fix (bad input, missing data, unreachable services)."""

from __future__ import annotations

__all__ = ["FlowrayError"]


class FlowrayError(Exception):
    """`str(err)` says what was expected and what was found; `hint` says what to try.

    The jobs print such errors as one line plus the hint (jobs/errors.py) instead of a traceback.
    """

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint
