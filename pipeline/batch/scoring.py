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

    <output>/model=<name>/version=<v>/_scoring.json          split, seed, draws, weights: what the
                                                              files mean (created once, compared after)
    <output>/model=<name>/version=<v>/shard-000000.parquet    the rows of shard-000000.tar
    <output>/model=<name>/version=<v>/_summary/<UTC time>/    summary.json, histogram, least likely

`name`/`v` come from pipeline.batch.resolve: the registry name and version; "run-<run id>" for a
runs:/ model and "local" for a local model directory, with the first 12 hex digits of the sha256
of the weights as the version.

A run goes through four phases, one module each:

    plan       check access, manifest, model and image shape; sweep this host's dead temps; list
               the shards without a file
    pipeline   pipeline.batch.score_pipeline: read_split -> map_batches(Scorer) on an actor pool
    collect    pipeline.batch.score_output: rows grouped by shard, each shard's file written
               once, when complete, so every key appears exactly once across crashes, retried
               tasks, reruns and concurrent jobs (a rerun scores only the shards without a file)
    report     pipeline.batch.score_report: summary files beside the outputs, MLflow summary run

Under on_error="skip", bad images (a member read whole that does not decode or breaks the image
limits) are logged with shard and key by the reader, left out of their shard's file and recorded
in its Parquet metadata; a shard that cannot be read whole (missing, truncated, another size or
sha256 than its manifest's, more or fewer samples, storage failing past the retries) gets no file
and is listed, with its reason, in the result, the summary and the MLflow run: every other shard
is scored, and a rerun tries the listed ones again. `ScoreResult.status` tells "complete" from
"partial" (shards left out) and "failed" (nothing of the split could be scored), which
`flowray score` turns into its exit code (0, 3, 1). Under on_error="fail" the job stops before
any work when the manifest disagrees with the shards present, and at the first problem.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.batch.resolve import BatchModel, resolve_batch_model
from pipeline.batch.score_config import ScoreConfig, ScoreError, ScoreResult
from pipeline.batch.score_output import (
    ShardCollector,
    check_settings,
    output_prefix,
    parquet_name,
)
from pipeline.batch.score_pipeline import build_pipeline
from pipeline.batch.score_report import ScoreStats, report
from pipeline.data.reader import SkipTally
from pipeline.data.shards import Manifest, ShardInfo, load_manifest
from pipeline.storage import check_access, list_names, sweep_temp_files

__all__ = ["ScoreConfig", "ScoreError", "ScoreResult", "score"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Plan:
    """What a run will do, settled before any work starts."""

    model: BatchModel
    manifest: Manifest
    prefix: str  # <output>/model=<name>/version=<v>
    pending: tuple[ShardInfo, ...]  # shards without a Parquet file yet
    present: bool  # the prefix holds files already
    settings: dict[str, Any]  # what the files mean: split, source, seed, draws, weights
    tracking_uri: str

    @property
    def already_done(self) -> int:
        return len(self.manifest.shards) - len(self.pending)


@dataclass(frozen=True)
class _Collected:
    written: tuple[str, ...]
    stats: ScoreStats
    images_skipped: int  # bad images left out of the shards written
    left_out: tuple[tuple[str, str], ...]  # (shard, reason): shards that got no file
    images_left_out: int  # images of those shards, by their manifest
    seconds: float


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
    plan = _plan(config)
    if not plan.pending:
        if plan.present:
            check_settings(plan.prefix, plan.settings, config.storage)
        nothing = _Collected((), ScoreStats(keep=0), 0, (), 0, 0.0)
        result = _result(plan, nothing)
        logger.info(result.line())
        return result
    check_settings(plan.prefix, plan.settings, config.storage)
    logger.info(
        "scoring %d of %d shards (%d images) of %s with %s -> %s",
        len(plan.pending),
        len(plan.manifest.shards),
        sum(info.count for info in plan.pending),
        config.input,
        plan.model.label,
        plan.prefix,
    )
    tally = SkipTally.shared() if config.on_error == "skip" else None
    shards = [info.name for info in plan.pending]
    rows = build_pipeline(config, plan.model.payload, plan.manifest, shards, tally)
    collected = _collect(config, plan, rows, tally, on_shard_written)
    result = _result(plan, collected)
    return report(config, result, collected.stats, tally, plan.tracking_uri, plan.manifest.shape)


def _plan(config: ScoreConfig) -> _Plan:
    """Check access, read the manifest, resolve the model, list the shards still to score."""
    import mlflow

    from pipeline.tracking.connection import resolve_tracking_uri

    storage = config.storage
    check_access(config.input, storage)
    check_access(config.output, storage)
    # Under "skip" the readers compare each shard with the manifest and leave out the bad ones;
    # only "fail" refuses the whole split up front when a shard is missing or has another size.
    manifest = load_manifest(config.input, storage, check_shards=config.on_error == "fail")
    tracking_uri = resolve_tracking_uri(config.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    model = resolve_batch_model(config.model)
    if tuple(manifest.shape) != model.image_shape:
        raise ScoreError(
            f"{config.input} holds images of shape {list(manifest.shape)} (C, H, W), but model "
            f"{config.model} ({model.label}) expects {list(model.image_shape)}",
            hint="score with a model trained on this image shape, or prepare the data with "
            "--channels/--size matching the model",
        )
    prefix = output_prefix(config.output, model.name, model.version)
    swept = sweep_temp_files(prefix, storage)  # temps of killed runs on this host
    if swept:
        logger.info("removed %d temp file(s) of earlier runs under %s", len(swept), prefix)
    present = set(list_names(prefix, storage))
    return _Plan(
        model=model,
        manifest=manifest,
        prefix=prefix,
        pending=tuple(i for i in manifest.shards if parquet_name(i.name) not in present),
        present=bool(present),
        settings={
            "split": manifest.split,
            "source": manifest.source,
            "seed": config.seed,
            "draws": config.draws,
            # A re-created model can reuse a version number: the weights say what was scored.
            "weights_sha256": hashlib.sha256(model.payload.weights).hexdigest(),
        },
        tracking_uri=tracking_uri,
    )


def _collect(
    config: ScoreConfig,
    plan: _Plan,
    rows: Any,
    tally: SkipTally | None,
    on_shard_written: Callable[[str], None] | None,
) -> _Collected:
    """Stream the score rows into the shard files and the statistics until the pipeline ends."""
    expected = {info.name: info.count for info in plan.pending}
    stats = ScoreStats(config.least_likely)
    collector = ShardCollector(plan.prefix, expected, config.storage, on_shard_written, stats.add)
    started = time.perf_counter()
    for batch in rows.iter_batches(batch_size=None, batch_format="pandas"):
        collector.add(batch)
    outcomes = tally.outcomes() if tally is not None else None
    collector.close(outcomes)
    written = set(collector.written)
    return _Collected(
        written=tuple(collector.written),
        stats=stats,
        images_skipped=sum(
            len(o.skipped_keys) for name, o in (outcomes or {}).items() if name in written
        ),
        left_out=tuple(sorted(collector.left_out.items())),
        images_left_out=sum(expected[name] for name in collector.left_out),
        seconds=time.perf_counter() - started,
    )


def _result(plan: _Plan, collected: _Collected) -> ScoreResult:
    """The run's result before the report (no statistics when nothing was scored: NaN)."""
    stats, seconds = collected.stats, collected.seconds
    return ScoreResult(
        model_name=plan.model.name,
        model_version=plan.model.version,
        output=plan.prefix,
        shards_total=len(plan.manifest.shards),
        shards_already_done=plan.already_done,
        shards_written=collected.written,
        images_scored=stats.count,
        images_skipped=collected.images_skipped,
        shards_left_out=collected.left_out,
        images_left_out=collected.images_left_out,
        mean_bits_per_dim=stats.mean,
        median_bits_per_dim=stats.quantile(0.5),
        p99_bits_per_dim=stats.quantile(0.99),
        images_per_second=stats.count / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        summary_url=None,
        mlflow_run_id=None,
    )
