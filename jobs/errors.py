"""One readable line plus a hint for the errors users meet, instead of a traceback.

Each job's `main` runs its work inside `user_errors()`; anything not listed here is a bug and keeps
its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["JobExit", "user_errors"]


class JobExit(SystemExit):
    """Raised by user_errors with exit code 2 after printing the message."""


def _known_errors() -> tuple[type[BaseException], ...]:
    from flowmodel.typed import ConfigError
    from pipeline.registry import ModelNotFound
    from pipeline.shards import ManifestError, PrepareError
    from pipeline.sources import SourceError
    from pipeline.storage import StorageError
    from pipeline.tracking import TrackingError
    from pipeline.trainer import PreflightError

    return (
        ConfigError,
        ModelNotFound,
        ManifestError,
        PrepareError,
        SourceError,
        StorageError,
        TrackingError,
        PreflightError,
        FileNotFoundError,
    )


@contextmanager
def user_errors(command: str) -> Iterator[None]:
    """Print `flowray <command>: <message>` and `hint: ...` for known errors, exit with code 2."""
    try:
        yield
    except _known_errors() as err:
        print(f"flowray {command}: {err}", file=sys.stderr)
        hint = getattr(err, "hint", "")
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        raise JobExit(2) from None
