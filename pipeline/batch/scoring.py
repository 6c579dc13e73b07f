"""Bulk likelihood scoring: a prepared split -> Parquet, one file per shard, exactly once per key.

    config = ScoreConfig(model="models:/fashion-flow@champion", input="s3://data/fmnist/test",
                         output="s3://scores/fmnist-test")
    result = score(config)          # Ray must be initialised (or Ray Data starts a local one)

Per image (one row): key, shard, label (-1 when none), log_likelihood (nats, of the discrete
image: the dequantization bound, K draws averaged in probability space), bits_per_dim,
png_bits_per_dim and ood_score.

OOD score (Serra et al. 2020, "Input complexity and out-of-distribution detection with
likelihood-based generative models", eq. 2): S(x) = -log2 p(x) - L(x), with L(x) the length in bits
of x under a generic lossless compressor; per dimension, ood_score = bits_per_dim - L(x) / D.
L(x) is the PNG of the decoded image re-encoded at maximum compression (zlib level 9), not the
stored PNG's length (`nbytes`): the stored bytes depend on how `prepare` encoded the shards (its
level, a future encoder), while the paper's complexity estimate is the best the compressor does,
so re-encoding makes the score a property of the image and the model only. It costs ~0.1 ms per
28x28 image, small next to the flow's forward pass. PNG's fixed overhead (signature, IHDR, IEND,
~70 bytes) is included: a constant shift for a given image shape, so rankings do not change.

Output layout:

    <output>/model=<name>/version=<v>/_scoring.json          seed, draws, split: what the files mean
    <output>/model=<name>/version=<v>/shard-000000.parquet    the rows of shard-000000.tar
    <output>/model=<name>/version=<v>/_summary/<UTC time>/    summary.json, histogram, least likely

`name`/`v` are the registry name and version; a local model directory is name "local" with version
the first 12 hex digits of the sha256 of its weights.

Exactly once: the Ray Data pipeline (read_split -> map_batches(Scorer) on an actor pool) streams
scored rows, without images, to the driver, which groups them by shard (deduplicating by key, in
case a task is retried) and writes a shard's file only when the shard is complete: all its manifest
count has arrived, or (for shards with skipped images) the stream has ended. Each file is written
atomically (local: temp name in the same folder, then rename; S3: one PUT, visible only when
complete), so a file present means its shard is done. A rerun lists the files present and reads
only the other shards. A crash loses only shards without a file, and they are scored whole next
time: every key appears exactly once across the output. Memory stays bounded: the driver holds the
small score rows of the shards being read, never images or the whole dataset.

Skipped images (undecodable, under on_error="skip") are logged with shard and key by the reader
and counted in the summary; a shard that yields no row at all gets no file, so it is retried.
"""

from __future__ import annotations

import heapq
import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np

from flowmodel.typed import flatten, to_dict
from pipeline.errors import FlowrayError
from pipeline.model.payload import FlowPayload
from pipeline.storage import (
    StorageConfig,
    check_access,
    join_url,
    list_names,
    make_temp_file,
    read_bytes,
    replace_with,
    write_bytes_atomic,
)

__all__ = [
    "OUTPUT_COLUMNS",
    "ScoreConfig",
    "ScoreError",
    "ScoreResult",
    "Scorer",
    "max_png_bytes",
    "output_prefix",
    "score",
]

logger = logging.getLogger(__name__)

OUTPUT_COLUMNS = (
    "key",
    "shard",
    "label",
    "log_likelihood",
    "bits_per_dim",
    "png_bits_per_dim",
    "ood_score",
)
SETTINGS_FILE = "_scoring.json"
SUMMARY_DIR = "_summary"
# Histogram for the summary: fine bins give median and p99 to 1e-3 bits/dim in bounded memory.
_FINE_BIN, _FINE_MAX = 1e-3, 64.0


class ScoreError(FlowrayError, RuntimeError):
    """Scoring cannot run as asked; the message says what was expected and what was found."""


@dataclass(frozen=True)
class ScoreConfig:
    """One scoring job. `model`, `input` and `output` are required; the rest has defaults.

    Attributes:
        model: models:/<name>@<alias>, models:/<name>/<version>, runs:/<id>/<path> or a local
            model directory.
        input: a prepared split, `<data>/<split>` (local path or s3://).
        output: a prefix (local or s3://); files go under model=<name>/version=<v>/.
        storage: S3 endpoint and region for input and output.
        batch_size: images per forward pass in an actor.
        actors: size of the scoring actor pool; 0 = one per CPU (or GPU) of the cluster, less one
            CPU left for reading.
        cpus_per_actor, gpus_per_actor: Ray resources of each actor (gpus > 0 scores on CUDA).
        read_concurrency: at most this many read tasks at once (None: Ray Data decides).
        draws: dequantization draws K per image, averaged in probability space.
        seed: dequantization seed; the same meaning as training's eval_seed, so scoring reproduces
            the training job's validation bits/dim.
        on_error: an unreadable image is logged, counted and left out ("skip") or stops the job.
        least_likely: how many of the least likely images the summary grid shows.
        tracking_uri: MLflow tracking URI (None: MLFLOW_TRACKING_URI, else the embedded SQLite).
        experiment: MLflow experiment of the summary run.
        log_to_mlflow: log the summary run (the files under _summary/ are written either way).
    """

    model: str
    input: str
    output: str
    storage: StorageConfig = field(default_factory=StorageConfig)
    batch_size: int = 256
    actors: int = 0
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    read_concurrency: int | None = None
    draws: int = 1
    seed: int = 0
    on_error: Literal["skip", "fail"] = "skip"
    least_likely: int = 32
    tracking_uri: str | None = None
    experiment: str = "flowray-scoring"
    log_to_mlflow: bool = True

    def __post_init__(self) -> None:
        for name in ("model", "input", "output"):
            if not getattr(self, name):
                raise ValueError(f"{name}: required, found an empty value")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, found {self.batch_size}")
        if self.actors < 0:
            raise ValueError(f"actors: expected >= 0 (0 = auto), found {self.actors}")
        if self.draws < 1:
            raise ValueError(f"draws: expected >= 1, found {self.draws}")
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ValueError(
                f"cpus_per_actor > 0 and gpus_per_actor >= 0 expected, found "
                f"{self.cpus_per_actor} and {self.gpus_per_actor}"
            )
        if self.least_likely < 0:
            raise ValueError(f"least_likely: expected >= 0, found {self.least_likely}")


@dataclass(frozen=True)
class ScoreResult:
    """What a scoring run did. Statistics cover the images scored by this run."""

    model_name: str
    model_version: str
    output: str  # <output>/model=<name>/version=<v>
    shards_total: int
    shards_already_done: int
    shards_written: tuple[str, ...]
    images_scored: int
    images_skipped: int
    mean_bits_per_dim: float
    median_bits_per_dim: float
    p99_bits_per_dim: float
    images_per_second: float
    seconds: float
    summary_url: str | None
    mlflow_run_id: str | None

    def line(self) -> str:
        """The one-line report a job prints at the end."""
        if not self.shards_written and not self.images_scored:
            return (
                f"nothing to score: all {self.shards_already_done}/{self.shards_total} shards of "
                f"model={self.model_name} version={self.model_version} already at {self.output}"
            )
        return (
            f"scored {self.images_scored:,} images ({len(self.shards_written)} shards written, "
            f"{self.shards_already_done} already done, {self.images_skipped} images skipped) "
            f"with {self.model_name} v{self.model_version} at {self.images_per_second:,.0f} "
            f"images/s; bits/dim mean {self.mean_bits_per_dim:.4f} median "
            f"{self.median_bits_per_dim:.4f} p99 {self.p99_bits_per_dim:.4f} -> {self.output}"
        )


def output_prefix(output: str, name: str, version: str) -> str:
    return join_url(output, f"model={name}", f"version={version}")


def max_png_bytes(image: np.ndarray) -> bytes:
    """uint8 [C, H, W] (C = 1 or 3) as PNG at maximum zlib compression (level 9)."""
    from PIL import Image

    if image.shape[0] == 1:
        picture = Image.fromarray(image[0], "L")
    else:
        picture = Image.fromarray(
            np.ascontiguousarray(image.transpose(1, 2, 0)), "RGB"
        )  # (H, W, C)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


class Scorer:
    """Ray Data callable class: loads the flow once per actor, scores batches of reader rows.

    Input batch (numpy): key, shard, image uint8 [B, C, H, W], label, nbytes. Output: the
    OUTPUT_COLUMNS plus `png`, the max-compression PNG of this batch's `keep_png` least likely
    images (b"" for the others), so the driver can draw the least likely images without images
    flowing through the pipeline.
    """

    def __init__(
        self, payload: Any, seed: int, draws: int, device: str = "cpu", keep_png: int = 0
    ) -> None:
        import ray

        if isinstance(payload, ray.ObjectRef):
            payload = ray.get(payload)
        self.flow = payload.load(device)
        self.seed, self.draws, self.keep_png = seed, draws, keep_png
        self.dims = self.flow.config.dims

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.model.likelihood import predict_frame

        # Ray hands read-only views (zero copy); torch wants writable memory.
        images = np.require(batch["image"], requirements=["C", "W"])  # (B, C, H, W) uint8
        keys = [str(key) for key in batch["key"]]
        frame = predict_frame(self.flow, images, keys, self.seed, self.draws)
        pngs = [max_png_bytes(image) for image in images]
        png_bits = np.array([8.0 * len(p) / self.dims for p in pngs])
        bits = frame["bits_per_dim"].to_numpy()
        kept = np.full(len(keys), b"", dtype=object)
        for i in np.argsort(-bits, kind="stable")[: self.keep_png]:
            kept[i] = pngs[i]
        return {
            "key": np.array(keys, dtype=object),
            "shard": np.asarray(batch["shard"], dtype=object),
            "label": np.asarray(batch["label"], dtype=np.int64),
            "log_likelihood": frame["log_likelihood"].to_numpy(),
            "bits_per_dim": bits,
            "png_bits_per_dim": png_bits,
            "ood_score": bits - png_bits,
            "png": kept,
        }


# ----------------------------------------------------------------------------- driver side


class _Stats:
    """Count, mean, fine histogram (for median / p99) and the least likely images, streaming."""

    def __init__(self, keep: int) -> None:
        self.count, self.total = 0, 0.0
        self.fine = np.zeros(int(_FINE_MAX / _FINE_BIN) + 1, dtype=np.int64)
        self.low, self.high = math.inf, -math.inf
        self.keep = keep
        self.worst: list[tuple[float, str, bytes]] = []  # min-heap on bits/dim

    def add(self, bits: np.ndarray, keys: np.ndarray, pngs: np.ndarray) -> None:
        if not len(bits):
            return
        self.count += len(bits)
        self.total += float(bits.sum())
        self.low, self.high = min(self.low, float(bits.min())), max(self.high, float(bits.max()))
        bins = np.clip((bits / _FINE_BIN).astype(np.int64), 0, len(self.fine) - 1)
        np.add.at(self.fine, bins, 1)
        for value, key, png in zip(bits, keys, pngs):
            if not png:
                continue
            item = (float(value), str(key), bytes(png))
            if len(self.worst) < self.keep:
                heapq.heappush(self.worst, item)
            elif item[0] > self.worst[0][0]:
                heapq.heapreplace(self.worst, item)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    def quantile(self, q: float) -> float:
        if not self.count:
            return math.nan
        rank = int(np.searchsorted(np.cumsum(self.fine), q * self.count, side="left"))
        return (rank + 0.5) * _FINE_BIN  # centre of the bin; exact to _FINE_BIN / 2

    def histogram(self, bins: int = 60) -> tuple[np.ndarray, np.ndarray]:
        """Counts over `bins` equal bins from the lowest to the highest value seen."""
        low = math.floor(self.low / _FINE_BIN)
        high = min(math.ceil(self.high / _FINE_BIN) + 1, len(self.fine))
        chunks = np.array_split(self.fine[low:high], bins)
        counts = np.array([c.sum() for c in chunks])
        starts = np.cumsum([0] + [len(c) for c in chunks])
        return counts, (low + starts) * _FINE_BIN


@dataclass
class _Partial:
    """Rows received for one shard so far."""

    frames: list[Any] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)


def _resolve(config: ScoreConfig) -> tuple[FlowPayload, str, str]:
    """The model's payload, name and version (local directories: "local" and a weights hash)."""
    from pipeline.tracking.registry import resolve_model

    resolved = resolve_model(config.model)
    payload = FlowPayload.from_flow(resolved.flow)
    if resolved.name:
        return payload, resolved.name, str(resolved.version)
    if resolved.uri.startswith("runs:/"):
        run_id = resolved.uri[len("runs:/") :].split("/", 1)[0]
        return payload, f"run-{run_id[:12]}", payload.digest()
    return payload, "local", payload.digest()


def _check_settings(prefix: str, settings: dict[str, Any], storage: StorageConfig) -> None:
    """Record what the files under `prefix` mean, or refuse to mix results of other settings."""
    url = join_url(prefix, SETTINGS_FILE)
    if SETTINGS_FILE in list_names(prefix, storage):
        found = json.loads(read_bytes(url, storage))
        if found != settings:
            differ = sorted(k for k in settings if found.get(k) != settings[k])
            raise ScoreError(
                f"{prefix} holds scores made with other settings ({', '.join(differ)}: "
                f"{', '.join(f'{found.get(k)!r}' for k in differ)}; this run: "
                f"{', '.join(f'{settings[k]!r}' for k in differ)})",
                hint="write to another --output, or rerun with the settings used before",
            )
        return
    write_bytes_atomic(url, json.dumps(settings, indent=1).encode(), storage)


def _write_shard(prefix: str, shard: str, frame: Any, storage: StorageConfig) -> str:
    """Write one shard's rows as Parquet, atomically (temp file, then rename or a single upload)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    url = join_url(prefix, _parquet_name(shard))
    frame = frame.sort_values("key", kind="stable").reset_index(drop=True)
    table = pa.Table.from_pandas(frame[list(OUTPUT_COLUMNS)], preserve_index=False)
    temp = make_temp_file(url)  # ".<name>.tmp-<pid>-<id>": readers skip dot-files
    pq.write_table(table, temp)
    replace_with(temp, url, storage)
    return url


def _parquet_name(shard: str) -> str:
    return shard.rsplit(".", 1)[0] + ".parquet"


def _pool_size(config: ScoreConfig) -> int:
    if config.actors:
        return config.actors
    import ray

    resources = ray.cluster_resources()
    if config.gpus_per_actor > 0:
        return max(1, int(resources.get("GPU", 0) // config.gpus_per_actor))
    # Leave one CPU for the read tasks, or actors would starve them.
    return max(1, int((resources.get("CPU", 1) - 1) // config.cpus_per_actor))


def score(
    config: ScoreConfig, *, on_shard_written: Callable[[str], None] | None = None
) -> ScoreResult:
    """Score the shards of `config.input` not yet scored; see the module docstring.

    Args:
        config: the job.
        on_shard_written: called with each shard's name after its file is in place (progress,
            tests that interrupt a run).

    Raises:
        ScoreError: image shape differs from the model's; output made with other settings.
        ModelNotFound, ManifestError, StorageError, TrackingError: from the layers below.
        CorruptDataError: an unreadable image under on_error="fail".
    """
    import ray
    import ray.data

    from pipeline.data.reader import SkipTally, read_split
    from pipeline.data.shards import load_manifest
    from pipeline.tracking.connection import resolve_tracking_uri

    storage = config.storage
    check_access(config.input, storage)
    check_access(config.output, storage)
    manifest = load_manifest(config.input, storage)
    tracking_uri = resolve_tracking_uri(config.tracking_uri)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    payload, name, version = _resolve(config)
    model_shape = tuple(payload.config["image_shape"])
    if tuple(manifest.shape) != model_shape:
        raise ScoreError(
            f"{config.input} holds images of shape {list(manifest.shape)} (C, H, W), but model "
            f"{config.model} ({name} v{version}) expects {list(model_shape)}",
            hint="score with a model trained on this image shape, or prepare the data with "
            "--channels/--size matching the model",
        )
    prefix = output_prefix(config.output, name, version)
    settings = {
        "split": manifest.split,
        "source": manifest.source,
        "seed": config.seed,
        "draws": config.draws,
    }
    present = set(list_names(prefix, storage))
    pending = [info for info in manifest.shards if _parquet_name(info.name) not in present]
    already = len(manifest.shards) - len(pending)
    if not pending:
        if present:
            _check_settings(prefix, settings, storage)
        result = ScoreResult(
            name, version, prefix, len(manifest.shards), already, (), 0, 0,
            math.nan, math.nan, math.nan, 0.0, 0.0, None, None,
        )  # fmt: skip
        logger.info(result.line())
        return result
    _check_settings(prefix, settings, storage)
    logger.info(
        "scoring %d of %d shards (%d images) of %s with %s v%s -> %s",
        len(pending),
        len(manifest.shards),
        sum(info.count for info in pending),
        config.input,
        name,
        version,
        prefix,
    )

    tally = SkipTally.shared() if config.on_error == "skip" else None
    dataset = read_split(
        config.input,
        storage,
        shards=[info.name for info in pending],
        on_error=config.on_error,
        tally=tally,
        manifest=manifest,
        rows_per_block=config.batch_size,
        concurrency=config.read_concurrency,
    )
    device = "cuda" if config.gpus_per_actor > 0 else "cpu"
    scored = dataset.map_batches(
        Scorer,
        fn_constructor_kwargs={
            "payload": ray.put(payload),
            "seed": config.seed,
            "draws": config.draws,
            "device": device,
            "keep_png": config.least_likely,
        },
        compute=ray.data.ActorPoolStrategy(size=_pool_size(config)),
        batch_size=config.batch_size,
        batch_format="numpy",
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor or None,
    )

    import pandas as pd

    expected = {info.name: info.count for info in pending}
    partial: dict[str, _Partial] = {}
    written: list[str] = []
    stats = _Stats(config.least_likely)
    started = time.perf_counter()

    def finish(shard: str) -> None:
        rows = partial.pop(shard)
        _write_shard(prefix, shard, pd.concat(rows.frames, ignore_index=True), storage)
        written.append(shard)
        if on_shard_written is not None:
            on_shard_written(shard)

    for batch in scored.iter_batches(batch_size=None, batch_format="pandas"):
        for shard, rows in batch.groupby("shard", sort=False):
            state = partial.setdefault(str(shard), _Partial())
            # A retried read task may send rows again: keep the first copy of each key.
            fresh = rows[~rows["key"].isin(state.keys)].drop_duplicates("key")
            if fresh.empty:
                continue
            state.keys.update(fresh["key"])
            state.frames.append(fresh.drop(columns="png"))
            stats.add(
                fresh["bits_per_dim"].to_numpy(), fresh["key"].to_numpy(), fresh["png"].to_numpy()
            )
            if len(state.keys) == expected[str(shard)]:
                finish(str(shard))
    # The stream has ended: every shard left holds all it will get (the rest were skipped).
    skipped = tally.by_shard() if tally is not None else {}
    for shard in sorted(partial):
        got = len(partial[shard].keys)
        if got + skipped.get(shard, 0) != expected[shard]:
            logger.warning(
                "shard %s: %d images scored + %d skipped, manifest says %d",
                shard,
                got,
                skipped.get(shard, 0),
                expected[shard],
            )
        finish(shard)
    seconds = time.perf_counter() - started
    missing = sorted(set(expected) - set(written))
    if missing:
        logger.warning(
            "no image of %d shard(s) could be read (%s): no file written, a rerun retries them",
            len(missing),
            ", ".join(missing[:5]),
        )

    result = ScoreResult(
        model_name=name,
        model_version=version,
        output=prefix,
        shards_total=len(manifest.shards),
        shards_already_done=already,
        shards_written=tuple(written),
        images_scored=stats.count,
        images_skipped=sum(skipped.values()),
        mean_bits_per_dim=stats.mean,
        median_bits_per_dim=stats.quantile(0.5),
        p99_bits_per_dim=stats.quantile(0.99),
        images_per_second=stats.count / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        summary_url=None,
        mlflow_run_id=None,
    )
    return _summarise(config, result, stats, tally, tracking_uri, manifest.shape)


def _summarise(
    config: ScoreConfig,
    result: ScoreResult,
    stats: _Stats,
    tally: Any,
    tracking_uri: str,
    shape: tuple[int, int, int],
) -> ScoreResult:
    """Write the summary files under _summary/<time>/ and log the MLflow summary run."""
    import dataclasses

    from pipeline.data.reader import decode_image
    from pipeline.plots import bits_per_dim_histogram, captioned_images_png

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    summary_url = join_url(result.output, SUMMARY_DIR, stamp)
    label = f"{result.model_name} v{result.model_version}"
    files: dict[str, bytes] = {}
    if stats.count:
        counts, edges = stats.histogram()
        files["bits_per_dim_histogram.png"] = bits_per_dim_histogram(
            counts,
            edges,
            f"bits/dim of {stats.count:,} images under {label}",
            markers={"mean": stats.mean, "p99": stats.quantile(0.99)},
        )
    worst = sorted(stats.worst, reverse=True)
    if worst:
        images = np.stack([decode_image(png, shape) for _, _, png in worst])
        captions = [f"{key}\n{bits:.3f} bits/dim" for bits, key, _ in worst]
        files["least_likely.png"] = captioned_images_png(
            images, captions, f"{len(worst)} least likely images under {label}"
        )
    metrics = {
        "images_scored": result.images_scored,
        "images_skipped": result.images_skipped,
        "shards_written": len(result.shards_written),
        "shards_already_done": result.shards_already_done,
        "mean_bits_per_dim": result.mean_bits_per_dim,
        "median_bits_per_dim": result.median_bits_per_dim,
        "p99_bits_per_dim": result.p99_bits_per_dim,
        "images_per_second": result.images_per_second,
        "seconds": result.seconds,
    }
    summary = {
        "model": config.model,
        "model_name": result.model_name,
        "model_version": result.model_version,
        "input": config.input,
        "output": result.output,
        "finished": stamp,
        "metrics": metrics,
        "least_likely": [{"key": key, "bits_per_dim": bits} for bits, key, _ in worst],
        "skipped": [dataclasses.asdict(s) for s in tally.records()[:100]] if tally else [],
    }
    files["summary.json"] = json.dumps(summary, indent=1, default=str).encode()
    for name, data in files.items():
        write_bytes_atomic(join_url(summary_url, name), data, config.storage)

    run_id = None
    if config.log_to_mlflow:
        import mlflow

        from pipeline.tracking.connection import ensure_experiment

        experiment_id = ensure_experiment(tracking_uri, config.experiment)
        tags = {
            "flowray.job": "score",
            "model_name": result.model_name,
            "model_version": result.model_version,
        }
        run_name = f"score {result.model_name} v{result.model_version} {stamp}"
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
            params = flatten(to_dict(config))
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if not _nan(v)})
            with tempfile.TemporaryDirectory() as tmp:
                for name, data in files.items():
                    with open(os.path.join(tmp, name), "wb") as file:
                        file.write(data)
                mlflow.log_artifacts(tmp, artifact_path="summary")
            run_id = run.info.run_id
    return dataclasses.replace(result, summary_url=summary_url, mlflow_run_id=run_id)


def _nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)
