"""One readable line plus a hint for the errors users meet, instead of a traceback (exit code 2).

    return run_main("flowray score", body)      # body() -> exit code
    with user_errors("flowray train"): ...       # the same, as a context manager

Anything not listed in `known_errors()` is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pipeline.errors import FlowrayError

__all__ = [
    "EXIT_USAGE",
    "JobExit",
    "UserError",
    "known_errors",
    "report",
    "run_main",
    "user_errors",
]

EXIT_USAGE = 2


class UserError(FlowrayError, RuntimeError):
    """A problem the user can fix, found by a job's own checks."""


class JobExit(SystemExit):
    """Raised by `user_errors` with EXIT_USAGE after the message is printed."""


HINTS = {
    "ModelNotFound": "check the name and alias with `flowray models list`",
    "ConfigError": "see `--help`; config keys are the dataclass fields of the job's config",
    "CorruptDataError": "pass --on-error skip to leave unreadable images out (they are counted)",
}


def known_errors() -> tuple[type[BaseException], ...]:
    """The error types that mean "the user can fix this" (imported lazily: each job is light)."""
    from flowmodel.typed import ConfigError
    from pipeline.data.reader import CorruptDataError
    from pipeline.tracking.registry import ModelNotFound

    return (FlowrayError, ConfigError, CorruptDataError, ModelNotFound, FileNotFoundError)


def report(prog: str, err: BaseException) -> None:
    """`<prog>: error: <first line>` and `hint: <hint>` on stderr."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    hint = getattr(err, "hint", "") or HINTS.get(type(err).__name__, "")
    print(f"{prog}: error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def _user_cause(err: BaseException) -> BaseException | None:
    """The user error itself, or the one Ray wrapped (task and Train worker errors carry a cause)."""
    known = known_errors()
    seen = 0
    while err is not None and seen < 5:
        if isinstance(err, known):
            return err
        err = getattr(err, "cause", None) or err.__cause__
        seen += 1
    return None


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run `body`; errors users meet become one line plus a hint and EXIT_USAGE."""
    try:
        return body()
    except Exception as err:
        cause = _user_cause(err)
        if cause is None:
            raise
        report(prog, cause)
        return EXIT_USAGE


@contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """`run_main` as a context manager: prints and raises JobExit(EXIT_USAGE) for user errors."""
    try:
        yield
    except Exception as err:
        cause = _user_cause(err)
        if cause is None:
            raise
        report(prog, cause)
        raise JobExit(EXIT_USAGE) from None
