"""A Ray Data datasource of read tasks: each task reads a group of shards through a given
function and emits blocks of rows. It knows nothing of formats; `pipeline.data.reader.read_input`
gives it the shards and the function. Imported only where a Ray dataset is built.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# (shard URLs of one task, seed, shuffle) -> the rows of those shards, in order.
ReadShards = Callable[[list[str], "int | None", bool], Iterator[dict]]


def _rows_to_block(rows: list[dict]) -> Any:
    """Rows (dicts of the same keys) as one Ray block: images stacked, strings as objects."""
    from ray.data.block import BlockAccessor

    batch = {}
    for column, first in rows[0].items():
        values = [r[column] for r in rows]
        if isinstance(first, np.ndarray):
            batch[column] = np.stack(values)  # (n, C, H, W)
        elif isinstance(first, str):
            batch[column] = np.array(values, dtype=object)
        else:
            batch[column] = np.array(values, dtype=np.int64)
    return BlockAccessor.batch_to_block(batch)


def _read_task(read: ReadShards, urls: list[str], seed: int | None, shuffle: bool, per_block: int):
    rows = read(urls, seed, shuffle)
    while block := list(itertools.islice(rows, per_block)):
        yield _rows_to_block(block)


@dataclass(frozen=True)
class TaskPlan:
    """What the read tasks read: shard URLs (passed to `read`) and size estimates."""

    name: str  # the datasource's name in Ray's progress and stats
    urls: Sequence[str]
    rows: Sequence[int | None]  # rows per shard, None when unknown until read
    bytes_per_row: int  # in memory
    read: ReadShards


def tasks_datasource(
    plan: TaskPlan,
    shuffle: bool,
    seed: int | None,
    rows_per_block: int,
    epoch_of: Callable[[], int] | None = None,
) -> Any:
    """A Ray Data Datasource: one read task per group of shards; with `shuffle`, the shard
    order is drawn again at every execution (epoch), reproducibly when a seed is given.

    The order of an execution is drawn with `seed + epoch`. With `epoch_of` (a picklable
    callable, asked when Ray plans the read) the epoch is whatever it answers, so the order is a
    function of (seed, epoch) alone: training passes one that reads the epoch its workers are
    about to start (pipeline.train.data_order). Without it, the epoch is this datasource's own
    count of read plans, which depends on how often Ray plans a read per pass (twice per epoch
    for a streaming split in Ray 2.x).
    """
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    known = all(r is not None for r in plan.rows)

    class ShardTasks(Datasource):
        def __init__(self) -> None:
            super().__init__()
            self._executions = 0

        def get_name(self) -> str:
            return plan.name

        def estimate_inmemory_data_size(self) -> int | None:
            return sum(plan.rows) * (plan.bytes_per_row + 64) if known else None  # type: ignore[arg-type]

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
            order = list(range(len(plan.urls)))
            task_seed = None
            if shuffle:
                epoch = self._executions if epoch_of is None else epoch_of()
                task_seed = None if seed is None else seed + epoch
                np.random.default_rng(task_seed).shuffle(order)
            self._executions += 1
            tasks = []
            groups = np.array_split(np.array(order), max(1, min(parallelism, len(order))))
            for i, group in enumerate(g for g in groups if len(g)):
                urls = [plan.urls[j] for j in group]
                rows = [plan.rows[j] for j in group]
                count = sum(rows) if all(r is not None for r in rows) else None  # type: ignore[arg-type]
                metadata = BlockMetadata(
                    num_rows=count,
                    size_bytes=None if count is None else count * (plan.bytes_per_row + 64),
                    input_files=urls,
                    exec_stats=None,
                )
                group_seed = None if task_seed is None else task_seed * 100_003 + i
                read = functools.partial(
                    _read_task, plan.read, urls, group_seed, shuffle, rows_per_block
                )
                tasks.append(ReadTask(read, metadata, per_task_row_limit=per_task_row_limit))
            return tasks

    return ShardTasks()
