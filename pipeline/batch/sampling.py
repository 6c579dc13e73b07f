"""Sample generation: Ray tasks draw images from a flow and the driver writes PNG WebDataset shards.

    result = generate(SampleConfig(model="models:/fashion-flow@champion", output="s3://b/samples"))

Determinism: the n images are cut into chunks of `chunk_size`; chunk i is drawn by one Ray task
with a generator seeded from (seed, i), a fixed batch shape and torch thread count, so the same
seed, chunk_size, temperature and model give the same images, byte for byte, whatever `tasks`.

Output, a split that `flowray score --input` reads like a prepared one:

    <output>/shard-000000.tar     WebDataset tar: samples-00000000.png ... (PNG, mode L or RGB)
    <output>/manifest.json        `pipeline.data.shards.Manifest`, written last and atomically
    <output>/grid.png             a grid of samples at each of `grid_temperatures`

The driver writes shards in image order from the chunks the tasks return (a window of chunks in
flight, so memory stays bounded), each moved whole into place. A rerun of a finished job (same
fingerprint) does nothing; an output written with other settings is refused. A run killed before
its manifest is rerun whole, byte for byte the same, after removing its dead temps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch

from flowmodel import Flow
from flowmodel.errors import FlowrayError
from flowmodel.typed import check_at_least, check_required
from pipeline.batch.resolve import BatchModel, log_batch_run, resolve_batch_model
from pipeline.data.images import encode_png
from pipeline.data.shards import (
    FORMAT,
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    ShardWriter,
    existing_manifest,
    shard_key,
    shard_name,
    write_manifest,
)
from pipeline.model.artifact import FlowPayload
from pipeline.storage import (
    StorageConfig,
    check_access,
    join_url,
    redact_url,
    sweep_temp_files,
    write_bytes_atomic,
)

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
        tasks: chunks in flight at once; 0 = two per CPU of the cluster (Ray runs one per CPU,
            the other waits ready, so no CPU idles while the driver writes shards).
        cpus_per_task: Ray CPUs (and torch threads) per task.
        gpus_per_task: Ray GPUs per task (> 0: the flow samples on CUDA; raise chunk_size to
            thousands so that a chunk fills the GPU). z comes from the same CPU generator on any
            device, but GPU arithmetic rounds differently: the bytes are reproducible for one
            device kind, and a GPU run is a different output from a CPU run (its fingerprint
            records the device).
        shard_samples: images per output shard.
        grid_temperatures: one grid panel per temperature.
        grid_images: images per grid panel.
        storage: S3 endpoint and region for the output.
        tracking_uri: MLflow tracking URI (None: $MLFLOW_TRACKING_URI, else
            sqlite:///<workdir>/mlflow.db, workdir $FLOWRAY_WORKDIR or flowray-work).
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
    gpus_per_task: float = 0.0
    shard_samples: int = 10_000
    grid_temperatures: tuple[float, ...] = (0.5, 0.7, 0.85, 1.0)
    grid_images: int = 36
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking_uri: str | None = None
    experiment: str = "flowray-sampling"
    log_to_mlflow: bool = True

    def __post_init__(self) -> None:
        check_required(self, "model", "output")
        check_at_least(self, 1, "n", "chunk_size", "cpus_per_task", "shard_samples")
        if self.tasks < 0:
            raise ValueError(f"tasks: expected >= 0 (0 = auto), found {self.tasks}")
        check_at_least(self, 0, "gpus_per_task")
        if self.temperature < 0 or any(t < 0 for t in self.grid_temperatures):
            raise ValueError("temperature and grid_temperatures: expected >= 0")


@dataclass(frozen=True)
class SampleResult:
    """What a sampling run did."""

    model_name: str
    model_version: str
    output: str
    images: int
    shards: int
    written: bool  # False: a finished identical run was found, nothing was written
    images_per_second: float = 0.0
    seconds: float = 0.0
    mlflow_run_id: str | None = None

    def line(self) -> str:
        """The one-line report a job prints at the end."""
        if not self.written:
            return (
                f"nothing to do: {self.images} samples with these settings already at {self.output}"
            )
        return (
            f"generated {self.images:,} images from {self.model_name} v{self.model_version} in "
            f"{self.shards} shard(s) at {self.images_per_second:,.0f} images/s -> "
            f"{redact_url(self.output)}"
        )


def chunk_seed(seed: int, index: int) -> int:
    """The generator seed of chunk `index`: a hash of (seed, index), 63 bits."""
    digest = hashlib.sha256(f"flowray-sample:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


_FLOWS: dict[str, Flow] = {}  # per worker process: weights digest + device -> flow, loaded once


def _sample_chunk(
    payload: FlowPayload,
    seed: int,
    index: int,
    count: int,
    temperature: float,
    threads: int,
    device: str = "cpu",
) -> list[bytes]:
    """Chunk `index`: `count` images as PNG bytes (a Ray task, also called in-process)."""
    torch.set_num_threads(threads)  # same thread count, same float reductions, same bytes
    key = f"{payload.digest()}@{device}"
    if key not in _FLOWS:
        _FLOWS.clear()
        _FLOWS[key] = payload.load(device)
    # z is drawn on the CPU whatever the device (Flow.sample copies it), and comes back as CPU
    # uint8 before PNG coding.
    generator = torch.Generator().manual_seed(chunk_seed(seed, index))
    images = _FLOWS[key].sample(count, temperature, generator)  # (count, C, H, W) uint8
    return [encode_png(image) for image in images.numpy()]


@dataclass(frozen=True)
class _Plan:
    """What a run will do, settled before any image is drawn."""

    model: BatchModel
    fingerprint: str  # hash of everything that decides the shards' bytes
    done: Manifest | None  # the manifest of a finished identical run at the output, if any
    tracking_uri: str


def generate(config: SampleConfig) -> SampleResult:
    """Generate `config.n` images into PNG shards + manifest + grid; Ray must be initialised (or a
    local instance starts). SampleError when the output holds samples made with other settings."""
    plan = _plan(config)
    model = plan.model
    if plan.done is not None:
        done = plan.done
        result = SampleResult(
            model.name, model.version, config.output, done.count, len(done.shards), False
        )
        logger.info(result.line())
        return result
    started = time.perf_counter()
    shards = _draw(config, model.payload)
    seconds = time.perf_counter() - started
    grid = _grid_png(model.flow, config, model.label)
    write_bytes_atomic(join_url(config.output, GRID_FILE), grid, config.storage)
    _write_manifest(config, plan, shards)
    rate = config.n / seconds if seconds > 0 else 0.0
    result = SampleResult(
        model.name, model.version, config.output, config.n, len(shards), True, rate, seconds
    )
    if config.log_to_mlflow:  # the config as params (not storage), the figures, the grid
        tags = {"flowray.job": "sample", "model_name": model.name, "model_version": model.version}
        metrics = {"images": config.n, "images_per_second": rate, "seconds": seconds}
        run_id = log_batch_run(
            config,
            plan.tracking_uri,
            f"sample {model.label}",
            tags,
            metrics,
            {GRID_FILE: grid},
            exclude=("storage",),
        )
        result = dataclasses.replace(result, mlflow_run_id=run_id)
    logger.info(result.line())
    return result


def _plan(config: SampleConfig) -> _Plan:
    """Check access, resolve the model, and find a finished run at the output (or refuse one
    made with other settings)."""
    import mlflow

    from pipeline.tracking.connection import resolve_tracking_uri

    check_access(config.output, config.storage)
    swept = sweep_temp_files(config.output, config.storage)  # temps of killed runs on this host
    if swept:
        logger.info("removed %d temp file(s) of earlier runs in %s", len(swept), config.output)
    tracking_uri = resolve_tracking_uri(config.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    model = resolve_batch_model(config.model)
    fingerprint = _fingerprint(config, model.payload)
    done = existing_manifest(join_url(config.output, MANIFEST_NAME), config.storage)
    if done is not None and done.fingerprint != fingerprint:
        raise SampleError(
            f"{config.output} already holds samples made with other settings "
            f"({done.source}, {done.count} images)",
            hint="write to a new --output, or rerun with the settings used before",
        )
    return _Plan(model=model, fingerprint=fingerprint, done=done, tracking_uri=tracking_uri)


def _fingerprint(config: SampleConfig, payload: FlowPayload) -> str:
    fields = {
        "weights": payload.digest(),
        "n": config.n,
        "temperature": config.temperature,
        "seed": config.seed,
        "chunk_size": config.chunk_size,
        "threads": config.cpus_per_task,
        "shard_samples": config.shard_samples,
    }
    # Only GPU runs add a key, so CPU runs keep the fingerprint of their outputs already written.
    if config.gpus_per_task > 0:
        fields["device"] = "cuda"
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _draw(config: SampleConfig, payload: FlowPayload) -> list[ShardInfo]:
    """Run the chunks as Ray tasks and write their images into shards, in image order."""
    import ray

    queue = [
        (i, min(config.chunk_size, config.n - i * config.chunk_size))
        for i in range(math.ceil(config.n / config.chunk_size))
    ]
    on_gpu = config.gpus_per_task > 0
    resources = ray.cluster_resources()
    per_task = config.gpus_per_task if on_gpu else config.cpus_per_task
    slots = max(1, int(resources.get("GPU" if on_gpu else "CPU", 1) // per_task))
    # Auto: two chunks per slot in flight, so a slot whose chunk is done starts its next one
    # while the driver still waits on an earlier chunk (consumption is in order).
    window = config.tasks or 2 * slots
    task = ray.remote(num_cpus=config.cpus_per_task, num_gpus=config.gpus_per_task, max_retries=2)(
        _sample_chunk
    )
    device = "cuda" if on_gpu else "cpu"
    payload_ref = ray.put(payload)
    writer = _ShardsInOrder(config.output, config.storage, config.shard_samples)
    in_flight: list[ray.ObjectRef] = []
    try:
        # In-order consumption with `window` chunks in flight: shards come out in image order.
        while queue or in_flight:
            while queue and len(in_flight) < window:
                index, count = queue.pop(0)
                args = (payload_ref, config.seed, index, count, config.temperature)
                in_flight.append(task.remote(*args, config.cpus_per_task, device))
            for png in ray.get(in_flight.pop(0)):
                writer.write(png)
        writer.close()
    except BaseException:
        writer.abort()
        for ref in in_flight:
            ray.cancel(ref)
        raise
    return writer.infos


class _ShardsInOrder:
    """Consecutive PNG samples into shards of `per_shard`; `infos` lists the shards written."""

    def __init__(self, output: str, storage: StorageConfig, per_shard: int) -> None:
        self.output, self.storage, self.per_shard = output, storage, per_shard
        self.infos: list[ShardInfo] = []
        self.index = 0  # next sample index
        self._shard: ShardWriter | None = None

    def write(self, png: bytes) -> None:
        if self._shard is None:
            url = join_url(self.output, shard_name(len(self.infos)))
            self._shard = ShardWriter(url, self.storage, self.index)
        self._shard.write({"__key__": shard_key(SPLIT, self.index), "png": png})
        self.index += 1
        if self._shard.count == self.per_shard:
            self.close()

    def close(self) -> None:
        if self._shard is not None:
            self.infos.append(self._shard.close())
            self._shard = None

    def abort(self) -> None:
        if self._shard is not None:
            self._shard.abort()
            self._shard = None


def _grid_png(flow: Flow, config: SampleConfig, label: str) -> bytes:
    """One panel per grid temperature, titled with the model's label."""
    from pipeline.plots import image_grid, titled_grid_png

    panels = []
    for temperature in config.grid_temperatures:
        # One seed for all panels: the same z scaled by each temperature, so panels compare.
        generator = torch.Generator().manual_seed(chunk_seed(config.seed, -1))
        images = flow.sample(config.grid_images, temperature, generator).numpy()
        panels.append((f"temperature {temperature:g}", image_grid(images)))
    return titled_grid_png(panels, f"samples from {label} (seed {config.seed})")


def _write_manifest(config: SampleConfig, plan: _Plan, shards: list[ShardInfo]) -> None:
    source = (
        f"samples:{redact_url(config.model)} ({plan.model.label}) "
        f"temperature={config.temperature:g} seed={config.seed}"
    )
    manifest = Manifest(
        split=SPLIT,
        count=config.n,
        shape=plan.model.image_shape,
        shards=tuple(shards),
        source=source,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        fingerprint=plan.fingerprint,
        format=FORMAT,
    )
    write_manifest(join_url(config.output, MANIFEST_NAME), manifest, config.storage)
