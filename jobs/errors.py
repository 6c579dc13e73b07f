"""One readable line plus a hint for the errors users meet, instead of a traceback, and the exit
code that says what kind of error it was.

    return run_main("flowray score", body)      # body() -> exit code
    with user_errors("flowray train"): ...       # the same, as a context manager

A user error is a `FlowrayError` (its message says what was expected and what was found, its
`hint` what to try) or a FileNotFoundError (a path the user gave). Anything else is a bug and
keeps its traceback.

Exit codes, the same for every command (`flowray --help` and docs/cli.md list them):
    0  done: every item processed
    1  runtime failure: a service down or refusing (tracking server, S3, cluster), data broken
       mid-run, a bug
    2  usage or configuration error: a bad option, config key, path, model reference or
       combination; nothing was done
    3  finished, but some items were left out (and reported)
    4  refused by a rule: the command ran and declined, nothing changed (`models promote` of a
       version that is not better than the alias's holder; --force overrides)
    5  drift: the scored images are not the data the model was calibrated on, at the level the
       user asked to fail at (`flowray score --fail-on-drift`, `flowray scores drift --fail-on`)
A user error exits 2 unless its class (or the error itself) says otherwise with an `exit_code`
attribute: a FlowrayError that reports a runtime failure sets `exit_code = 1`
(`exit_code_of`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flowmodel.errors import FlowrayError

# Exit codes, the same for every command (documented in `flowray --help` and docs/cli.md).
EXIT_OK = 0  # done: every item processed
EXIT_FAILURE = 1  # the job failed at run time (a bug, a service down, a Ray failure)
EXIT_USAGE = 2  # usage or configuration error: nothing was done
EXIT_PARTIAL = 3  # finished, but some items (e.g. unreadable shards) were left out and reported
EXIT_REFUSED = 4  # refused by a rule (a promotion that is not better): nothing changed
EXIT_DRIFT = 5  # a drift verdict at or above the level asked to fail at (scoring)
USER_ERRORS: tuple[type[BaseException], ...] = (FlowrayError, FileNotFoundError)
# Ray wraps a task's or Train worker's error (RayTaskError.cause, TrainingFailedError's
# __cause__); a few links are enough to reach ours.
_MAX_WRAPPERS = 5


class UserError(FlowrayError, RuntimeError):
    """A problem the user can fix, found by a job's own checks: a usage error (exit 2) unless
    `exit_code` says it is a runtime failure (EXIT_FAILURE)."""

    def __init__(self, message: str, hint: str = "", exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code


class JobExit(SystemExit):
    """Raised by `user_errors` with the error's exit code after the message is printed."""


def exit_code_of(err: BaseException) -> int:
    """EXIT_USAGE for a user error, unless it carries another `exit_code` (module docstring)."""
    code = getattr(err, "exit_code", None)
    return code if isinstance(code, int) and not isinstance(code, bool) else EXIT_USAGE


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
        if err is None or isinstance(err, USER_ERRORS):
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


@contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """`run_main` as a context manager: prints and raises JobExit(<exit code>) for user errors."""
    try:
        yield
    except Exception as err:
        cause = user_cause(err)
        if cause is None:
            raise
        report(prog, cause)
        raise JobExit(exit_code_of(cause)) from None
