"""The Ray Data side of scoring: read the pending shards, score them on an actor pool.

    read_input (read tasks: tar -> decoded uint8 images at the model's shape; a prepared split
                or foreign WebDataset shards, decoded and fitted in place)
      [-> map_batches(add_png_complexity)   GPU actors only: fused into the read tasks]
      -> map_batches(Scorer, compute=ActorPoolStrategy(size))   one flow per actor, loaded once
      -> rows without images: key, shard (URL), label, log_likelihood, bits_per_dim,
         png_bits_per_dim, ood_score, orig_width, orig_height, shard_rows (the reader's end
         marker), and `png` for the few least likely images of each batch

The scores are pipeline.model.scores'; its complexity term L(x) is the PNG of the decoded image at
maximum compression. CPU actors compute it beside the flow's forward pass; for GPU actors the
read tasks compute it (CPU work, many tasks at once), so that a GPU never waits on PNG coding, and
GPU actors take batches large enough to fill the GPU (`actor_batch_size`), copied from pinned
memory (pipeline.model.likelihood).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from pipeline.batch.scoring.config import ScoreConfig
from pipeline.data.inputs import InputPlan
from pipeline.data.tally import SkipTally
from pipeline.model.artifact import FlowPayload
from pipeline.model.likelihood import CHUNK_DIMS
from pipeline.model.scores import add_png_complexity, score_images

# Bound on the object store the pipeline fills between readers and actors (`buffer_limit`).
# Unbounded, Ray Data lets the readers (~5x faster than scoring on a CPU) run ahead up to half the
# object store, so peak memory would grow with the input. Eight batches per actor keep every actor
# fed (it holds two in flight) with room for a read task's next blocks.
BUFFERED_BATCHES_PER_ACTOR = 8
MIN_BUFFER_BYTES = 64 << 20


class Scorer:
    """Ray Data callable class: loads the flow once per actor, scores batches of reader rows.

    Input: read_input's rows (`png` and `png_bits_per_dim` too when `add_png_complexity` ran
    before). Output: the score rows (module docstring) with `png`, the max-compression PNG of the
    batch's `keep_png` least likely images (b"" for the others), so the driver can draw them
    without images flowing through the pipeline. `precision` "bf16" runs the conditioners under
    bfloat16 autocast (faster on GPUs; bits/dim differ in the 3rd-4th decimal, docs/gpu.md).
    """

    def __init__(
        self,
        payload: Any,
        seed: int,
        draws: int,
        device: str = "cpu",
        keep_png: int = 0,
        precision: str = "fp32",
    ) -> None:
        import ray

        if isinstance(payload, ray.ObjectRef):
            payload = ray.get(payload)
        self.flow = payload.load(device).set_precision(precision)
        self.seed, self.draws, self.keep_png = seed, draws, keep_png
        self.dims = self.flow.config.dims

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Ray hands read-only views (zero copy); torch wants writable memory.
        images = np.require(batch["image"], requirements=["C", "W"])  # (B, C, H, W) uint8
        keys = [str(key) for key in batch["key"]]
        if "png" not in batch:
            batch = add_png_complexity(batch)
        scores = score_images(
            self.flow, images, keys, self.seed, self.draws, batch["png_bits_per_dim"]
        )
        pngs, bits = batch["png"], scores["bits_per_dim"]
        kept = np.full(len(keys), b"", dtype=object)
        for i in np.argsort(-bits, kind="stable")[: self.keep_png]:
            kept[i] = pngs[i]
        return {
            "key": np.array(keys, dtype=object),
            "shard": np.asarray(batch["shard"], dtype=object),
            "label": np.asarray(batch["label"], dtype=np.int64),
            **scores,
            **{name: _passed(batch, name, len(keys)) for name in PASSED_THROUGH},
            "png": kept,
        }


PASSED_THROUGH = ("orig_width", "orig_height", "shard_rows")


def _passed(batch: dict[str, np.ndarray], name: str, count: int) -> np.ndarray:
    """A reader column the actor hands on unchanged; -1 where the caller (serving) has none."""
    if name in batch:
        return np.asarray(batch[name], dtype=np.int64)
    return np.full(count, -1, dtype=np.int64)


def actor_batch_size(config: ScoreConfig, dims: int) -> int:
    """Images per actor batch: `config.batch_size` on CPUs; on GPUs at least the images that fill
    one chunk of pipeline.model.likelihood (CHUNK_DIMS values: 5,461 images of 3x32x32), since a
    GPU forward pass of a few hundred small images leaves it mostly idle."""
    if config.gpus_per_actor > 0:
        return max(config.batch_size, CHUNK_DIMS // dims)
    return config.batch_size


def local_cpus() -> int:
    """Logical CPUs of a local Ray started for the batch jobs: one per core plus one. The pool is
    "CPUs less one for the read tasks" (`pool_size`), and reading is light next to the forward
    pass, so every core runs a model actor and the reader shares them. (Read tasks holding no CPU
    would exceed Ray's soft limit of one worker per CPU: Ray would start one per read task.)"""
    return (os.cpu_count() or 2) + 1


def pool_size(config: ScoreConfig) -> int:
    """Actors in the pool: `config.actors`, else as many as the cluster's resources allow."""
    if config.actors:
        return config.actors
    import ray

    resources = ray.cluster_resources()
    if config.gpus_per_actor > 0:
        return max(1, int(resources.get("GPU", 0) // config.gpus_per_actor))
    # Leave one CPU for the read tasks, or actors would starve them.
    return max(1, int((resources.get("CPU", 1) - 1) // config.cpus_per_actor))


def buffer_limit(actors: int, batch_size: int, shape: tuple[int, int, int]) -> int:
    """Bytes of object store the scoring pipeline may fill: BUFFERED_BATCHES_PER_ACTOR batches of
    uint8 images per actor, at least MIN_BUFFER_BYTES (a read task's blocks for small images)."""
    batch_bytes = batch_size * int(np.prod(shape))
    return max(MIN_BUFFER_BYTES, BUFFERED_BATCHES_PER_ACTOR * actors * batch_bytes)


def build_pipeline(
    config: ScoreConfig,
    payload: FlowPayload,
    plan: InputPlan,
    shards: list[str],
    tally: SkipTally | None,
    shape: tuple[int, int, int],
) -> Any:
    """The lazy Ray Dataset of the score rows of `shards` (URLs of the plan's shards), read at
    the model's image `shape` (C, H, W).

    `tally` receives each shard's outcome and the images the readers skip.
    """
    import ray
    import ray.data

    from pipeline.data.reader import read_input

    on_gpu = config.gpus_per_actor > 0
    batch_size = actor_batch_size(config, int(np.prod(shape)))
    actors = pool_size(config)
    dataset = read_input(
        plan,
        config.storage,
        shape=shape,
        shards=shards,
        on_error=config.on_error,
        tally=tally,
        rows_per_block=batch_size,
        concurrency=config.read_concurrency,
    )
    # The dataset's context is its own copy (read_datasource copies the current one): the bound
    # applies to this job only.
    options = dataset.context.execution_options
    options.resource_limits = options.resource_limits.copy(
        object_store_memory=buffer_limit(actors, batch_size, shape)
    )
    if on_gpu:  # a task-based map right after the read: Ray Data fuses it into the read tasks
        dataset = dataset.map_batches(add_png_complexity, batch_format="numpy")
    return dataset.map_batches(
        Scorer,
        fn_constructor_kwargs={
            "payload": ray.put(payload),
            "seed": config.seed,
            "draws": config.draws,
            "device": "cuda" if on_gpu else "cpu",
            "keep_png": config.least_likely,
        },
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor or None,
    )
