"""The base of every error a user can fix (bad input, missing data, unreachable services).

It lives here, in the pure-PyTorch package, because flowmodel's own config errors are such errors
and flowmodel imports nothing from pipeline; `pipeline.errors` re-exports this same class.
"""

from __future__ import annotations

__all__ = ["FlowrayError"]


class FlowrayError(Exception):
    """`str(err)` says what was expected and what was found; `hint` says what to try.

    A subclass may set a class-level `hint` that fits all its instances; a `hint` passed to the
    constructor replaces it. The jobs print such errors as one line plus the hint
    (jobs/errors.py) instead of a traceback.
    """

    hint: str = ""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint
