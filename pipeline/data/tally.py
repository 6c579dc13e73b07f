"""What readers report, and the error of bad data: one `ShardOutcome` per shard, the samples skipped.

    tally = SkipTally.shared()          # a Ray actor; read tasks on any node report to it
    ds = read_input(plan, storage, shape=shape, on_error="skip", tally=tally)
    ...consume ds...
    tally.outcomes()[url]               # ShardOutcome(complete=True, rows=9998, ...), by shard URL
    tally.total(), tally.records()[:5]  # samples not handed on; the first skip records

A shard's outcome is reported before its last row is handed on (`pipeline.data.reader`), so by
the time a stream has ended every shard's outcome is in the tally. `complete`: every byte read
(transient faults retried, never counted), the tar ended cleanly and, with a manifest entry, size,
sha256 and sample count match; then `rows` + len(`skipped_keys`) == `expected`. An incomplete
shard says why in `reason`; `transient` marks the ones a rerun may read (storage kept failing, or
the shard changed after it was listed).

`SkipTally()` lives in this process (for `iter_input`); `SkipTally.shared()` is backed by a small
Ray actor (num_cpus=0, on the driver's node, so losing a worker node does not lose it) that read
tasks report to and wait for, so that once iteration has finished every outcome is in the tally.
A shard reported twice (a retried read task) keeps the last report.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from flowmodel.errors import FlowrayError

OnError = Literal["skip", "fail"]
WHOLE_SHARD = "*"  # the key of a problem that concerns a whole shard
_MAX_RECORDS = 1000


class CorruptDataError(FlowrayError, RuntimeError):
    """A sample or shard cannot be read (on_error="fail"); names the shard and the key.

    Broken data found mid-run is a runtime failure (exit 1), not a usage error. Through Ray it
    arrives as RayTaskError(CorruptDataError), an instance of both, so `except CorruptDataError`
    works in the driver.
    """

    exit_code = 1  # jobs.errors.EXIT_FAILURE

    hint = (
        "pass --on-error skip (score) or --set data.on_error=skip (train) to leave unreadable "
        "images out (they are counted)"
    )

    def __init__(self, shard: str, key: str, reason: str) -> None:
        super().__init__(f"shard {shard}, key {key}: {reason}")
        self.shard, self.key, self.reason = shard, key, reason

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray pickles task errors; keep the three fields, not the formatted message.
        return (type(self), (self.shard, self.key, self.reason))


@dataclass(frozen=True)
class Skipped:
    """Samples skipped under on_error="skip": `count` samples at `key` (WHOLE_SHARD: a shard)."""

    shard: str
    key: str
    reason: str
    count: int = 1


@dataclass(frozen=True)
class ShardOutcome:
    """How reading one shard ended (see the module docstring)."""

    shard: str  # the shard's URL
    expected: int  # samples its manifest entry lists; without one, the samples met in the tar
    rows: int  # rows handed on
    complete: bool
    reason: str = ""  # why it is incomplete; "" when complete
    skipped_keys: tuple[str, ...] = ()  # bad images (their rows were not handed on)
    retries: int = 0  # transient storage faults ridden out
    transient: bool = False  # incomplete because storage kept failing: a rerun may read it
    # the version read ("etag:..." on S3, "stat:..." locally; see pipeline.data.inputs)
    version: str = ""

    @property
    def lost(self) -> int:
        """Samples expected that were not handed on."""
        return self.expected - self.rows


class _Counts:
    """The tally's state; held in this process or inside the Ray actor."""

    def __init__(self) -> None:
        self.records: list[Skipped] = []
        self.outcomes: dict[str, ShardOutcome] = {}

    def add_outcome(self, outcome: ShardOutcome, records: list[Skipped]) -> None:
        again = outcome.shard in self.outcomes
        self.outcomes[outcome.shard] = outcome
        if not again:  # a retried read task reports the same problems again
            self.records.extend(records[: _MAX_RECORDS - len(self.records)])

    def outcome(self, shard: str) -> ShardOutcome | None:
        return self.outcomes.get(shard)

    def state(self) -> tuple[list[Skipped], dict[str, ShardOutcome]]:
        return list(self.records), dict(self.outcomes)


@functools.cache
def _tally_actor_class() -> Any:
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(_Counts)


class SkipTally:
    """Shard outcomes and skipped samples reported by readers (see the module docstring)."""

    def __init__(self, actor: Any = None) -> None:
        """`actor`: the Ray actor of a shared tally (`shared()`); None: counted in this process."""
        self._actor = actor
        self._local = _Counts() if actor is None else None

    @classmethod
    def shared(cls) -> SkipTally:
        """A tally backed by a Ray actor, for readers running in Ray tasks (Ray must be up)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # Pinned to the driver's node: on a worker node that dies (a lost node that Ray Train
        # rides out) it would take every outcome with it; the driver's node dying ends the job.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        return cls(_tally_actor_class().options(scheduling_strategy=here).remote())

    @property
    def is_shared(self) -> bool:
        return self._actor is not None

    def add_outcome(self, outcome: ShardOutcome, records: Sequence[Skipped] = ()) -> None:
        """Record how a shard ended, with its skip records (logged lines, capped)."""
        self._call("add_outcome", outcome, list(records))

    def _call(self, method: str, *args: Any) -> Any:
        if self._actor is None:
            return getattr(self._local, method)(*args)
        import ray

        # Wait for it: once a read task has moved on, what it reported must be visible.
        return ray.get(getattr(self._actor, method).remote(*args))

    def total(self) -> int:
        """Samples expected that were not handed on (bad images, shards left out)."""
        return sum(o.lost for o in self.outcomes().values())

    def records(self) -> list[Skipped]:
        """The first 1000 skip records, in report order."""
        return self._call("state")[0]

    def outcome(self, shard: str) -> ShardOutcome | None:
        """The outcome of one shard, or None before it has been read (one small call: a
        consumer asking per shard does not copy every outcome each time)."""
        return self._call("outcome", shard)

    def outcomes(self) -> dict[str, ShardOutcome]:
        """{shard: outcome} of every shard read (or refused) so far."""
        return dict(sorted(self._call("state")[1].items()))

    def __reduce__(self) -> tuple[Any, ...]:
        if self._actor is None:
            # A copy in another process would count there and report nothing here.
            raise TypeError(
                "a local SkipTally cannot be sent to other processes; use SkipTally.shared()"
            )
        return (SkipTally, (self._actor,))
