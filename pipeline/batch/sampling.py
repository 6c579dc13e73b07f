"""Sample generation: Ray tasks draw images from a flow and the driver writes PNG WebDataset shards.

    result = generate(SampleConfig(model="models:/fashion-flow@champion", output="s3://b/samples"))

Determinism: the n images are cut into chunks of `chunk_size`; chunk i is drawn by one Ray task
with a generator seeded from (seed, i) (a hash, like the keyed dequantization noise), with a fixed
batch shape and torch thread count. So the same seed, chunk_size, temperature and model give the
same images, byte for byte, whatever the number of tasks running at once (`tasks`).

Output, a split that `flowray score --input` and `pipeline.data.reader` read like a prepared one:

    <output>/shard-000000.tar     WebDataset tar: samples-00000000.png ... (PNG, mode L or RGB)
    <output>/manifest.json        `pipeline.data.shards.Manifest`, written last and atomically
    <output>/grid.png             a grid of samples at each of `grid_temperatures`

Shards are written by the driver in image order from the chunks the tasks return (a window of
`tasks` chunks in flight, so memory stays bounded); each shard goes to a temp file, then is renamed
or uploaded whole (atomic). A rerun of a finished job (same manifest fingerprint) does nothing; an
output written with other settings is refused, never overwritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from flowmodel.typed import to_dict
from pipeline.errors import FlowrayError
from pipeline.model.payload import FlowPayload
from pipeline.storage import (
    StorageConfig,
    check_access,
    exists,
    join_url,
    make_temp_file,
    read_bytes,
    replace_with,
    write_bytes_atomic,
)

__all__ = ["SPLIT", "SampleConfig", "SampleError", "SampleResult", "chunk_seed", "generate"]

logger = logging.getLogger(__name__)

SPLIT = "samples"
GRID_FILE = "grid.png"


class SampleError(FlowrayError, RuntimeError):
    """Sampling cannot run as asked; `hint` says what to try."""


@dataclass(frozen=True)
class SampleConfig:
    """One sampling job. `model` and `output` are required.

    Attributes:
        model: models:/<name>@<alias>, models:/<name>/<version>, runs:/... or a local model dir.
        output: prefix (local or s3://) for the shards, manifest and grid.
        n: number of images.
        temperature: z ~ N(0, temperature^2 I) for the shards (below 1: smoother, more typical).
        seed: every chunk's generator derives from it (see module docstring).
        chunk_size: images per chunk, the unit of seeding and of one Ray task.
        tasks: chunks generated at once; 0 = one per CPU of the cluster.
        cpus_per_task: Ray CPUs (and torch threads) per task.
        shard_samples: images per output shard.
        grid_temperatures: one grid panel per temperature.
        grid_images: images per grid panel.
        storage: S3 endpoint and region for the output.
        tracking_uri: MLflow tracking URI (None: MLFLOW_TRACKING_URI, else the embedded SQLite).
        experiment: MLflow experiment of the sampling run.
        log_to_mlflow: log a run with the grid and the figures.
    """

    model: str
    output: str
    n: int = 64
    temperature: float = 0.7
    seed: int = 0
    chunk_size: int = 64
    tasks: int = 0
    cpus_per_task: int = 1
    shard_samples: int = 10_000
    grid_temperatures: tuple[float, ...] = (0.5, 0.7, 0.85, 1.0)
    grid_images: int = 36
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking_uri: str | None = None
    experiment: str = "flowray-sampling"
    log_to_mlflow: bool = True

    def __post_init__(self) -> None:
        for name in ("model", "output"):
            if not getattr(self, name):
                raise ValueError(f"{name}: required, found an empty value")
        for name in ("n", "chunk_size", "cpus_per_task", "shard_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, found {getattr(self, name)}")
        if self.tasks < 0:
            raise ValueError(f"tasks: expected >= 0 (0 = auto), found {self.tasks}")
        if self.temperature < 0 or any(t < 0 for t in self.grid_temperatures):
            raise ValueError("temperature and grid_temperatures: expected >= 0")


@dataclass(frozen=True)
class SampleResult:
    model_name: str
    model_version: str
    output: str
    images: int
    shards: int
    written: bool  # False: a finished identical run was found, nothing was written
    images_per_second: float
    seconds: float
    mlflow_run_id: str | None

    def line(self) -> str:
        if not self.written:
            return (
                f"nothing to do: {self.images} samples with these settings already at {self.output}"
            )
        return (
            f"generated {self.images:,} images from {self.model_name} v{self.model_version} in "
            f"{self.shards} shard(s) at {self.images_per_second:,.0f} images/s -> {self.output}"
        )


def chunk_seed(seed: int, index: int) -> int:
    """The generator seed of chunk `index`: a hash of (seed, index), 63 bits."""
    digest = hashlib.sha256(f"flowray-sample:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


_FLOWS: dict[str, Any] = {}  # per worker process: weights digest -> flow, loaded once


def _sample_chunk(
    payload: FlowPayload, seed: int, index: int, count: int, temperature: float, threads: int
) -> list[bytes]:
    """Chunk `index`: `count` images as PNG bytes (a Ray task, also called in-process)."""
    import torch

    from pipeline.data.shards import encode_png

    torch.set_num_threads(threads)  # same thread count, same float reductions, same bytes
    key = payload.digest()
    if key not in _FLOWS:
        _FLOWS.clear()
        _FLOWS[key] = payload.load("cpu")
    generator = torch.Generator().manual_seed(chunk_seed(seed, index))
    images = _FLOWS[key].sample(count, temperature, generator)  # (count, C, H, W) uint8
    return [encode_png(image) for image in images.numpy()]


class _ShardWriter:
    """Writes consecutive samples into shards of `per_shard`, each atomically; collects ShardInfo."""

    def __init__(self, output: str, storage: StorageConfig, per_shard: int) -> None:
        self.output, self.storage, self.per_shard = output, storage, per_shard
        self.infos: list[Any] = []
        self.index = 0  # next sample index
        self._writer: Any = None
        self._temp = ""
        self._count = 0

    def write(self, png: bytes) -> None:
        import webdataset as wds

        from pipeline.data.shards import shard_key

        if self._writer is None:
            url = join_url(self.output, self._name())
            self._temp = make_temp_file(url, ".tar")
            self._stream = open(self._temp, "wb")  # noqa: SIM115 (closed in _close)
            self._writer = wds.TarWriter(
                self._stream, encoder=False, mtime=0, user="flowray", group="flowray"
            )
            self._start, self._count = self.index, 0
        self._writer.write({"__key__": shard_key(SPLIT, self.index), "png": png})
        self.index += 1
        self._count += 1
        if self._count == self.per_shard:
            self.close()

    def _name(self) -> str:
        from pipeline.data.shards import shard_name

        return shard_name(len(self.infos))

    def close(self) -> None:
        from pipeline.data.shards import ShardInfo

        if self._writer is None:
            return
        # We own the stream: TarWriter does not close streams it did not open.
        self._writer.close()
        self._stream.close()
        digest = hashlib.sha256()
        with open(self._temp, "rb") as file:
            while chunk := file.read(8 << 20):
                digest.update(chunk)
        name = self._name()
        info = ShardInfo(
            name, self._count, digest.hexdigest(), os.path.getsize(self._temp), self._start
        )
        replace_with(self._temp, join_url(self.output, name), self.storage)
        self.infos.append(info)
        self._writer = None

    def abort(self) -> None:
        if self._writer is not None:
            self._stream.close()
            if os.path.exists(self._temp):
                os.remove(self._temp)
            self._writer = None


def _resolve(config: SampleConfig) -> tuple[FlowPayload, str, str, Any]:
    from pipeline.tracking.registry import resolve_model

    resolved = resolve_model(config.model)
    payload = FlowPayload.from_flow(resolved.flow)
    if resolved.name:
        return payload, resolved.name, str(resolved.version), resolved.flow
    return payload, "local", payload.digest(), resolved.flow


def _grid_png(flow: Any, config: SampleConfig, label: str) -> bytes:
    import torch

    from pipeline.plots import image_grid, titled_grid_png

    panels = []
    for temperature in config.grid_temperatures:
        # One seed for all panels: the same z scaled by each temperature, so panels compare.
        generator = torch.Generator().manual_seed(chunk_seed(config.seed, -1))
        images = flow.sample(config.grid_images, temperature, generator).numpy()
        panels.append((f"temperature {temperature:g}", image_grid(images)))
    return titled_grid_png(panels, f"samples from {label} (seed {config.seed})")


def generate(config: SampleConfig) -> SampleResult:
    """Generate `config.n` images into PNG shards + manifest + grid (see the module docstring).

    Ray must be initialised (or a local instance starts). Raises SampleError when the output
    holds samples made with other settings; ModelNotFound, StorageError, TrackingError below.
    """
    import mlflow
    import ray

    from pipeline.data.shards import FORMAT, MANIFEST_NAME, Manifest, parse_manifest
    from pipeline.tracking.connection import resolve_tracking_uri

    storage = config.storage
    check_access(config.output, storage)
    tracking_uri = resolve_tracking_uri(config.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    payload, name, version, flow = _resolve(config)
    shape = tuple(flow.config.image_shape)
    fingerprint = hashlib.sha256(
        json.dumps(
            {
                "weights": payload.digest(),
                "n": config.n,
                "temperature": config.temperature,
                "seed": config.seed,
                "chunk_size": config.chunk_size,
                "threads": config.cpus_per_task,
                "shard_samples": config.shard_samples,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    manifest_url = join_url(config.output, MANIFEST_NAME)
    if exists(manifest_url, storage):
        previous = parse_manifest(read_bytes(manifest_url, storage), manifest_url)
        if previous.fingerprint == fingerprint:
            result = SampleResult(
                name, version, config.output, previous.count, len(previous.shards),
                False, 0.0, 0.0, None,
            )  # fmt: skip
            logger.info(result.line())
            return result
        raise SampleError(
            f"{config.output} already holds samples made with other settings "
            f"({previous.source}, {previous.count} images)",
            hint="write to a new --output, or rerun with the settings used before",
        )

    chunks = [
        (i, min(config.chunk_size, config.n - i * config.chunk_size))
        for i in range(math.ceil(config.n / config.chunk_size))
    ]
    window = config.tasks or max(
        1, int(ray.cluster_resources().get("CPU", 1) // config.cpus_per_task)
    )
    task = ray.remote(num_cpus=config.cpus_per_task, max_retries=2)(_sample_chunk)
    payload_ref = ray.put(payload)
    writer = _ShardWriter(config.output, storage, config.shard_samples)
    started = time.perf_counter()
    queue, in_flight = list(chunks), []
    try:
        # In-order consumption with `window` chunks in flight: shards come out in image order.
        while queue or in_flight:
            while queue and len(in_flight) < window:
                index, count = queue.pop(0)
                args = (payload_ref, config.seed, index, count, config.temperature)
                in_flight.append(task.remote(*args, config.cpus_per_task))
            for png in ray.get(in_flight.pop(0)):
                writer.write(png)
        writer.close()
    except BaseException:
        writer.abort()
        for ref in in_flight:
            ray.cancel(ref)
        raise
    seconds = time.perf_counter() - started

    label = f"{name} v{version}"
    grid = _grid_png(flow, config, label)
    write_bytes_atomic(join_url(config.output, GRID_FILE), grid, storage)
    manifest = Manifest(
        split=SPLIT,
        count=config.n,
        shape=shape,  # type: ignore[arg-type]
        shards=tuple(writer.infos),
        source=f"samples:{config.model} ({label}) temperature={config.temperature:g} seed={config.seed}",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        fingerprint=fingerprint,
        format=FORMAT,
    )
    # Last, and atomically: a manifest present means every shard it lists is complete.
    write_bytes_atomic(manifest_url, json.dumps(to_dict(manifest), indent=1).encode(), storage)
    result = SampleResult(
        name, version, config.output, config.n, len(writer.infos), True,
        config.n / seconds if seconds > 0 else 0.0, seconds, None,
    )  # fmt: skip
    if config.log_to_mlflow:
        result = dataclasses.replace(
            result, mlflow_run_id=_log_run(config, result, grid, tracking_uri)
        )
    logger.info(result.line())
    return result


def _log_run(config: SampleConfig, result: SampleResult, grid: bytes, tracking_uri: str) -> str:
    import mlflow

    from pipeline.tracking.connection import ensure_experiment

    experiment_id = ensure_experiment(tracking_uri, config.experiment)
    tags = {
        "flowray.job": "sample",
        "model_name": result.model_name,
        "model_version": result.model_version,
    }
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=f"sample {result.model_name} v{result.model_version}",
        tags=tags,
    ) as run:
        params = to_dict(config)
        params.pop("storage")
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_metrics(
            {
                "images": result.images,
                "images_per_second": result.images_per_second,
                "seconds": result.seconds,
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, GRID_FILE)
            with open(path, "wb") as file:
                file.write(grid)
            mlflow.log_artifact(path)
        return run.info.run_id
