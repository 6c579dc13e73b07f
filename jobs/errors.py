"""One readable line plus a hint for the errors users meet, instead of a traceback, and the exit
code that says what kind of error it was.

    return run_main("flowray score", body)      # body() -> exit code

A user error is a `FlowrayError` (its message says what was expected and what was found, its
`hint` what to try, its `exit_code` what kind of error it is) or a FileNotFoundError (a path the
user gave, exit 2). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from flowmodel.errors import FlowrayError

# Exit codes, the same for every command (documented in `flowray --help` and docs/cli.md).
EXIT_OK = 0  # done: every item processed
EXIT_FAILURE = 1  # runtime failure: a service down or refusing, data broken mid-run, a bug
EXIT_USAGE = 2  # usage or configuration error: nothing was done
EXIT_PARTIAL = 3  # finished, but some items (e.g. unreadable shards) were left out and reported
EXIT_REFUSED = 4  # refused by a rule (a promotion that is not better; --force overrides)
EXIT_DRIFT = 5  # a drift verdict at or above the level asked to fail at (score, scores drift)
# Ray wraps a task's or Train worker's error (RayTaskError.cause, TrainingFailedError's
# __cause__); a few links are enough to reach ours.
_MAX_WRAPPERS = 5


class UserError(FlowrayError, RuntimeError):
    """A problem the user can fix, found by a job's own checks: a usage error (exit 2) unless
    `exit_code` says it is a runtime failure (EXIT_FAILURE)."""


def exit_code_of(err: BaseException) -> int:
    """The error's `exit_code`; EXIT_USAGE for a user error without one (a FileNotFoundError)."""
    return getattr(err, "exit_code", EXIT_USAGE)


def report(prog: str, err: BaseException) -> None:
    """`<prog>: error: <first line>` and, when the error has one, `hint: <hint>` on stderr."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    hint = err.hint if isinstance(err, FlowrayError) else ""
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def user_cause(err: BaseException | None) -> BaseException | None:
    """The user error itself, or the one Ray wrapped; None when `err` is a bug."""
    for _ in range(_MAX_WRAPPERS):
        if err is None or isinstance(err, (FlowrayError, FileNotFoundError)):
            return err
        err = getattr(err, "cause", None) or err.__cause__
    return None


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run `body`; errors users meet become one line plus a hint and their exit code."""
    try:
        return body()
    except Exception as err:
        cause = user_cause(err)
        if cause is None:
            raise
        report(prog, cause)
        return exit_code_of(cause)
