"""Bulk likelihood scoring: any input -> Parquet, one file per shard, exactly once per key.

    config = ScoreConfig(model="models:/fashion-flow@champion", input="s3://data/fmnist/test",
                         output="s3://scores/fmnist-test")
    result = score(config)          # Ray must be initialised (or Ray Data starts a local one)

docs/scoring.md is the user's side: inputs (`pipeline.data.inputs.resolve_input`: a prepared
split, or WebDataset shards decoded and fitted to the model's shape in the read tasks), the
columns, flags and drift, the nightly run over a growing prefix, exit codes. The files go under
`<output>/model=<name>/version=<v>/` (`name`, `v`: pipeline.batch.resolve), named by shard and
version (`output.shard_file`).

A run goes through four phases, one module each:

    plan       check access, and that the output store refuses a second create of one object
               (write-once; else exit 2 unless single_writer); list the input once, model and image
               shape; sweep this host's dead temps; list the shards without a file for their
               version (new, rewritten in place, re-prepared); record or check the settings
    pipeline   pipeline.batch.scoring.actors: read_input -> map_batches(Scorer) on an actor pool
    collect    pipeline.batch.scoring.output: rows grouped by shard, each shard's file written
               once, when complete, so every key appears exactly once across crashes, retried
               tasks, reruns and concurrent jobs (a rerun scores only the shards without a file)
    report     pipeline.batch.scoring.report: summary files beside the outputs, MLflow summary run

Under on_error="skip", bad images are left out of their shard's file (named in its Parquet
metadata); a shard that cannot be read whole gets no file and is listed with its reason in the
result, the summary and the MLflow run, and a rerun tries it again: `ScoreResult.status` is
"complete", "partial" or "failed" (nothing could be scored). Under on_error="fail" the job stops
before any work when the manifest disagrees with the shards present, and at the first problem.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.batch.resolve import BatchModel, resolve_batch_model
from pipeline.batch.scoring.actors import build_pipeline
from pipeline.batch.scoring.config import ScoreConfig, ScoreError, ScoreResult
from pipeline.batch.scoring.output import (
    PREPARED_SHARDS_KEY,
    SETTINGS_FILE,
    SHARD_SIZE_KEY,
    SHARD_URL_KEY,
    SHARD_VERSION_KEY,
    ShardCollector,
    ShardTarget,
    check_settings,
    file_stem,
    orphan_files,
    output_prefix,
    remove_files,
    shard_file,
)
from pipeline.batch.scoring.report import ScoreStats, drift_unknown, report
from pipeline.data.inputs import InputPlan, resolve_input
from pipeline.data.tally import SkipTally
from pipeline.model.calibration import Calibration, DropTally
from pipeline.storage import (
    StorageConfig,
    WriteOnceUnsupported,
    check_access,
    check_write_once,
    join_url,
    list_files,
    read_bytes,
    redact_url,
    sweep_temp_files,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Plan:
    """What a run will do, settled before any work starts."""

    model: BatchModel
    input: InputPlan
    prefix: str  # <output>/model=<name>/version=<v>
    targets: dict[str, ShardTarget]  # shards to score, by URL: where their rows go
    tracking_uri: str
    changed: int = 0  # foreign shards rewritten since their file was written
    orphans: tuple[str, ...] = ()  # files of shards the input no longer lists
    calibration: Calibration | None = None  # the model version's (registry), if it has one
    unknown: str = ""  # the verdict line without one ("drift: unknown (...)")

    @property
    def already_done(self) -> int:
        return len(self.input.shards) - len(self.targets)

    @property
    def new(self) -> int:
        return len(self.targets) - self.changed


@dataclass(frozen=True)
class _Collected:
    stats: ScoreStats
    written: tuple[str, ...] = ()
    files: tuple[str, ...] = ()  # their Parquet files
    images_skipped: int = 0  # bad images left out of the shards written
    left_out: tuple[tuple[str, str], ...] = ()  # (shard, reason): shards that got no file
    images_left_out: int = 0  # images of those shards, by their manifest (foreign: samples met)
    seconds: float = 0.0


def score(
    config: ScoreConfig, *, on_shard_written: Callable[[str], None] | None = None
) -> ScoreResult:
    """Score the shards of `config.input` not yet scored (module docstring); `on_shard_written`
    gets each shard's label (URL; a prepared shard's name) once its file is in place (progress,
    tests that interrupt a run).

    Raises:
        ScoreError: image shape differs from the model's; output made with other settings.
        ModelNotFound, InputError, ManifestError, StorageError, TrackingError: from below.
        CorruptDataError: an unreadable image under on_error="fail".
    """
    plan = _plan(config)
    if not plan.targets:
        result = _result(plan, _Collected(ScoreStats(keep=0)))
        logger.info(result.line())
        return result
    logger.info(
        "scoring %d of %d shards of %s with %s -> %s",
        len(plan.targets),
        len(plan.input.shards),
        redact_url(config.input),
        plan.model.label,
        plan.prefix,
    )
    # A tally under "fail" too: the outcomes tell a shard read whole with no image in it (an
    # empty file, so it is not read again) from one never read.
    tally = SkipTally.shared()
    shape = plan.model.image_shape
    rows = build_pipeline(config, plan.model.payload, plan.input, list(plan.targets), tally, shape)
    calibration, drop = plan.calibration, None
    if calibration is not None:
        drop = DropTally(calibration.threshold(config.flag_quantile), calibration.bits_mean)
    collected = _collect(config, plan, rows, tally, on_shard_written, drop)
    result = _result(plan, collected)
    return report(
        config, result, collected.stats, tally, plan.tracking_uri, shape, calibration, drop
    )


def _plan(config: ScoreConfig) -> _Plan:
    """Check access, list the input once, resolve the model, settle the shards still to score;
    record the settings of the files, or check them against those recorded (`check_settings`)."""
    import mlflow

    from pipeline.tracking.connection import resolve_tracking_uri

    storage = config.storage
    check_access(config.input, storage)
    check_access(config.output, storage)
    try:  # exactly-once rests on write_once: prove the output store refuses a second create
        check_write_once(config.output, storage)
    except WriteOnceUnsupported as err:
        if not config.single_writer:
            raise
        logger.warning("%s; going on as --single-writer asks", err)
    source = resolve_input(config.input, storage)
    logger.info("input %s", redact_url(source.describe()))
    if source.missing:
        logger.warning(
            "%d shard(s) named by %s do not exist (first: %s); scoring the others",
            len(source.missing),
            redact_url(config.input),
            redact_url(source.missing[0]),
        )
    if config.on_error == "fail":
        # Under "fail" a prepared split is refused up front when a shard is missing or resized;
        # under "skip" the reader leaves out the bad ones.
        source.check_shards()
    tracking_uri = resolve_tracking_uri(config.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    model = resolve_batch_model(config.model)
    calibration, registered = None, config.model.startswith("models:/")
    if registered:
        from pipeline.tracking.registry import load_calibration

        calibration = load_calibration(model.name, model.version)
    problem = calibration.problem() if calibration is not None else ""
    unknown = drift_unknown(model.name, model.version, registered, problem)
    if problem:
        logger.warning("%s", unknown)
        calibration = None
    elif calibration is not None:  # the verdict's line, unless nothing is scored
        unknown = "drift: unknown (no images scored in this run)"
    manifest = source.manifest
    if manifest is not None and tuple(manifest.shape) != model.image_shape:
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
    names = sorted(list_files(prefix, storage))
    settings = {
        "seed": config.seed,
        "draws": config.draws,
        # A re-created model can reuse a version number: the weights say what was scored.
        "weights_sha256": hashlib.sha256(model.payload.weights).hexdigest(),
        # The dequantization noise function: another one gives other numbers.
        "noise_scheme": model.payload.noise_scheme,
    }
    recorded = (
        json.loads(read_bytes(join_url(prefix, SETTINGS_FILE), storage))
        if SETTINGS_FILE in names
        else None
    )
    first: dict[str, str] | None = None
    if manifest is not None:
        shards = {info.name: info.sha256 for info in manifest.shards}
        settings |= {"split": manifest.split, "source": manifest.source}
        settings[PREPARED_SHARDS_KEY] = shards
        first = shards if recorded is None else recorded.get(PREPARED_SHARDS_KEY)
    else:
        source = _recorded_root(source, recorded)
        settings["input"] = redact_url(source.root)
    targets, changed = _targets(source, names, prefix, storage, first)
    plan = _Plan(
        model=model,
        input=source,
        prefix=prefix,
        targets=targets,
        tracking_uri=tracking_uri,
        changed=changed,
        orphans=orphan_files(names, {ref.stem for ref in source.shards}),
        calibration=calibration,
        unknown=unknown,
    )
    logger.info(
        "listed %d shards in %.2f s: %d new, %d changed, %d already done",
        len(source.shards),
        source.listing_seconds,
        plan.new,
        plan.changed,
        plan.already_done,
    )
    if targets or names:
        check_settings(prefix, settings, storage)
    return plan


def _recorded_root(source: InputPlan, settings: dict[str, Any] | None) -> InputPlan:
    """`source` with its shards named under the root `_scoring.json` recorded (`settings`), when
    that root holds every shard and differs from the computed one (a list file's shards in other
    folders than at the first run, or a prefix scored before list roots were the list's folder),
    so the files keep their names and the settings their input."""
    recorded = (settings or {}).get("input")
    if not isinstance(recorded, str) or recorded in ("", redact_url(source.root)):
        return source
    if redact_url(recorded) != recorded:  # redacted when recorded: not a URL to name under
        return source
    return source.rooted(recorded) or source


def _targets(
    source: InputPlan,
    names: list[str],
    prefix: str,
    storage: StorageConfig,
    first: dict[str, str] | None,
) -> tuple[dict[str, ShardTarget], int]:
    """The shards without a file (`shard_file`: named by version, or by content against
    `first`), and how many of them had a file of other content (rewritten in place or
    re-prepared). Files of older versions of shards already done (a run that stopped between
    writing the new file and deleting the old) are deleted here."""
    versions: dict[str, set[str]] = {}  # the versioned shard files, by stem
    for name in names:
        if name.endswith(".parquet") and "@" in name:
            versions.setdefault(file_stem(name), set()).add(name)
    present = set(names)
    targets: dict[str, ShardTarget] = {}
    changed, leftovers = 0, []
    for ref in source.shards:
        current = shard_file(ref, first)
        others = versions.get(ref.stem, set())
        if ref.expect is not None and f"{ref.stem}.parquet" in present:
            others = others | {f"{ref.stem}.parquet"}  # of the first preparation
        stale = tuple(sorted(others - {current}))
        if current in present:
            leftovers.extend(stale)
            continue
        changed += bool(stale)
        if ref.expect is not None:  # labelled by name; its count known
            targets[ref.url] = ShardTarget(current, ref.name, ref.expect.count, {}, stale)
            continue
        metadata = {
            SHARD_URL_KEY: redact_url(ref.url),
            SHARD_VERSION_KEY: ref.version,
            SHARD_SIZE_KEY: str(ref.size),
        }
        targets[ref.url] = ShardTarget(current, ref.url, None, metadata, stale)
    if leftovers:
        logger.info("removing %d file(s) of older shard versions", len(leftovers))
        remove_files(prefix, leftovers, storage)
    return targets, changed


def _collect(
    config: ScoreConfig,
    plan: _Plan,
    rows: Any,
    tally: SkipTally,
    on_shard_written: Callable[[str], None] | None,
    drop: DropTally | None,
) -> _Collected:
    """Stream the score rows into the shard files, the statistics and `drop` (flagged at its
    threshold) until the pipeline ends."""
    stats = ScoreStats(config.least_likely)

    def on_rows(frame: Any) -> None:
        stats.add(frame)
        if drop is not None:
            drop.add(frame["bits_per_dim"].to_numpy(), frame["ood_score"].to_numpy())

    collector = ShardCollector(
        plan.prefix,
        plan.targets,
        config.storage,
        on_shard_written,
        on_rows,
        tally.outcome,
        orphans=plan.orphans,
        threshold=drop.threshold if drop is not None else None,
    )
    started = time.perf_counter()
    for batch in rows.iter_batches(batch_size=None, batch_format="pandas"):
        collector.add(batch)
    outcomes = tally.outcomes()
    collector.close(outcomes)
    by_label = {target.label: url for url, target in plan.targets.items()}
    written = [by_label[label] for label in collector.written]
    left_out = [by_label[label] for label in collector.left_out]

    def images_of(url: str) -> int:  # the manifest's count, else the samples the reader met
        expected, outcome = plan.targets[url].expected, outcomes.get(url)
        return expected if expected is not None else (outcome.expected if outcome else 0)

    return _Collected(
        stats,
        written=tuple(collector.written),
        files=tuple(plan.targets[url].file for url in written),
        images_skipped=sum(len(outcomes[url].skipped_keys) for url in written if url in outcomes),
        left_out=tuple(sorted(collector.left_out.items())),
        images_left_out=sum(images_of(url) for url in left_out),
        seconds=time.perf_counter() - started,
    )


def _result(plan: _Plan, collected: _Collected) -> ScoreResult:
    """The run's result before the report (no statistics when nothing was scored: NaN)."""
    stats, seconds = collected.stats, collected.seconds
    return ScoreResult(
        model_name=plan.model.name,
        model_version=plan.model.version,
        output=plan.prefix,
        shards_total=len(plan.input.shards),
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
        input_kind=plan.input.kind,
        listing_seconds=plan.input.listing_seconds,
        shards_new=plan.new,
        shards_changed=plan.changed,
        files_written=collected.files,
        drift=plan.unknown,
    )
