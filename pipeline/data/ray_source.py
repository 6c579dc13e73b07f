"""The Ray Data side of `pipeline.data.reader.read_split`: a datasource of shard-reading tasks.

Imported only inside `read_split`, so the plain iterator never imports Ray.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from pipeline.data.reader import _read_shards, _Spec
from pipeline.storage import join_url

__all__ = ["shard_datasource"]


def _rows_to_block(rows: list[dict]) -> Any:
    from ray.data.block import BlockAccessor

    batch = {
        "key": np.array([r["key"] for r in rows], dtype=object),
        "shard": np.array([r["shard"] for r in rows], dtype=object),
        "image": np.stack([r["image"] for r in rows]),  # (n, C, H, W)
        "label": np.array([r["label"] for r in rows], dtype=np.int64),
        "nbytes": np.array([r["nbytes"] for r in rows], dtype=np.int64),
    }
    return BlockAccessor.batch_to_block(batch)


def _read_task(spec: _Spec, names: list[str], seed: int | None, shuffle: bool, rows_per_block: int):
    rows: list[dict] = []
    for row in _read_shards(spec, names, seed, shuffle):
        rows.append(row)
        if len(rows) == rows_per_block:
            yield _rows_to_block(rows)
            rows = []
    if rows:
        yield _rows_to_block(rows)


def shard_datasource(
    spec: _Spec, names: list[str], shuffle: bool, seed: int | None, rows_per_block: int
) -> Any:
    """A Ray Data Datasource reading `names` of the split in `spec`."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    image_bytes = int(np.prod(spec.manifest.shape))

    class ShardDatasource(Datasource):
        """One read task per group of shards; shard order reshuffled at every execution."""

        def __init__(self) -> None:
            super().__init__()
            self._executions = 0

        def get_name(self) -> str:
            return "FlowrayShards"

        def estimate_inmemory_data_size(self) -> int:
            return sum(spec.manifest.shard(n).count for n in names) * (image_bytes + 64)

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
            order = list(names)
            task_seed = None
            if shuffle:
                # A new permutation per execution (epoch); reproducible when a seed is given.
                task_seed = None if seed is None else seed + self._executions
                np.random.default_rng(task_seed).shuffle(order)
            self._executions += 1
            groups = [
                g
                for g in np.array_split(
                    np.array(order, dtype=object), max(1, min(parallelism, len(order)))
                )
                if len(g)
            ]
            tasks = []
            for i, group in enumerate(groups):
                group_names = [str(n) for n in group]
                count = sum(spec.manifest.shard(n).count for n in group_names)
                metadata = BlockMetadata(
                    num_rows=count,
                    size_bytes=count * (image_bytes + 64),
                    input_files=[join_url(spec.split_url, n) for n in group_names],
                    exec_stats=None,
                )
                group_seed = None if task_seed is None else task_seed * 100_003 + i
                read = functools.partial(
                    _read_task, spec, group_names, group_seed, shuffle, rows_per_block
                )
                tasks.append(ReadTask(read, metadata, per_task_row_limit=per_task_row_limit))
            return tasks

    return ShardDatasource()
