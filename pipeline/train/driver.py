"""`flowray train` on the driver: preflight checks, MLflow run and lineage, the Ray TorchTrainer,
then the logged, registered model.

    result = train(load_config(TrainConfig, "fashion-mnist", ["max_steps=500"]))

Rerunning with the same run name and storage path resumes from the latest checkpoint (Ray Train V2
restores it through `get_checkpoint()`) and continues the same MLflow run.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowmodel.errors import FlowrayError
from pipeline.storage import redact_url
from pipeline.train.config import TrainConfig

if TYPE_CHECKING:
    from ray.train import Result
    from ray.train.torch import TorchTrainer

    from flowmodel import Flow
    from pipeline.data.inputs import InputPlan
    from pipeline.data.tally import SkipTally
    from pipeline.train.checkpoint import TrainState
    from pipeline.train.worker import TrainHooks

RUN_TAG = "flowray.run_name"


class TrainingStopped(FlowrayError, RuntimeError):
    """The run stopped for a reason a retry cannot fix (too many non-finite steps)."""

    exit_code = 1  # a runtime failure (jobs.errors.EXIT_FAILURE), not a usage error


class PreflightError(FlowrayError, ValueError):
    """The job cannot start; the message names what was expected and what was found."""


@dataclass(frozen=True)
class TrainResult:
    steps: int
    val_bits_per_dim: float
    mlflow_run_id: str
    model_name: str
    model_version: str
    promoted: bool
    promotion_reason: str
    checkpoint_path: str
    skipped_images: int
    images_per_second: float


def preflight(config: TrainConfig, local_ray: bool) -> dict[str, InputPlan]:
    """Check data and resources before Ray starts. Returns the two inputs, each listed once:
    a prepared split (its manifest checked) or foreign WebDataset shards (any input spec
    `pipeline.data.inputs.resolve_input` accepts)."""
    from pipeline.train.worker import decoded_rows

    # Resources first: they fail without touching storage.
    cores = os.cpu_count() or 1
    if local_ray and config.scaling.num_workers * config.scaling.cpus_per_worker > cores:
        raise PreflightError(
            f"scaling: {config.scaling.num_workers} workers x {config.scaling.cpus_per_worker} CPUs "
            f"need more than this machine's {cores} cores",
            hint="lower scaling.num_workers or scaling.cpus_per_worker, or pass --address of a Ray cluster",
        )
    if config.scaling.use_gpu and local_ray:
        import torch

        if not torch.cuda.is_available():
            raise PreflightError("scaling.use_gpu is true but this machine has no CUDA device")

    plans = {
        "train": _checked_input(config, "train", config.data.train),
        "validation": _checked_input(config, "validation", config.data.validation),
    }
    needed = config.batch_size * config.scaling.num_workers
    train_count = image_count(plans["train"])
    if train_count is not None and train_count < needed:
        raise PreflightError(
            f"data.train has {train_count} images, fewer than one global batch "
            f"({config.batch_size} x {config.scaling.num_workers} workers = {needed})"
        )
    # Registration refuses a NaN validation figure: find out now, not after the whole run.
    validation = plans["validation"]
    if validation.manifest is not None:  # the shards present with the manifest's size are read
        usable = sum(r.expect.count for r in validation.shards if r.size == r.expect.bytes)
        found = f"{validation.manifest.count} in the manifest and {usable} in shards that can be read whole"
    else:  # foreign shards: counts are found by reading; one decodable image is enough here
        usable = len(list(itertools.islice(decoded_rows(config, validation), 1)))
        found = f"none that decodes in {len(validation.shards)} shard(s)"
    if usable == 0:
        raise PreflightError(
            f"data.validation ({config.data.validation}): expected at least one image, found "
            f"{found}",
            hint="prepare the validation split again, or point data.validation at another input",
        )
    return plans


def image_count(plan: InputPlan) -> int | None:
    """The images of a prepared split; None for foreign shards (counted while reading)."""
    return plan.manifest.count if plan.manifest is not None else None


def _checked_input(config: TrainConfig, role: str, url: str) -> InputPlan:
    """`url` resolved (one listing) into a prepared split or foreign shards. A prepared split's
    image shape must be the model's (foreign images are fitted to it while reading). Under skip
    a shard that disagrees with the manifest is left out by the reader, so only fail checks the
    shards here."""
    from pipeline.data.inputs import InputError, resolve_input

    try:
        plan = resolve_input(url, config.storage)
    except InputError as error:
        raise PreflightError(
            f"data.{role}: expected a prepared split (<data>/<split> with manifest.json) or "
            f"WebDataset shards (a brace pattern, a prefix of .tar files or a list file); {error}",
            hint=error.hint,
        ) from None
    if config.data.on_error == "fail":
        plan.check_shards()
        if plan.missing:
            raise PreflightError(
                f"data.{role} ({url}): {len(plan.missing)} shard(s) of the pattern or list do "
                f"not exist, e.g. {plan.missing[0]}",
                hint="fix the pattern, or set data.on_error=skip to leave them out",
            )
    manifest = plan.manifest
    if manifest is not None and tuple(manifest.shape) != tuple(config.model.image_shape):
        raise PreflightError(
            f"data.{role}: images are {list(manifest.shape)} (C, H, W) but model.image_shape is "
            f"{list(config.model.image_shape)}",
            hint="set model.image_shape to the data's shape, or prepare the data at the model's size",
        )
    return plan


def _mlflow_run(config: TrainConfig, tracking_uri: str, plans: dict[str, InputPlan]) -> str:
    """The MLflow run for this training run: created once, found again on resume."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.connection import ensure_experiment, log_config_params

    experiment_id = ensure_experiment(tracking_uri, config.mlflow.experiment)
    client = MlflowClient(tracking_uri)
    storage_tag = f"{config.run.storage_path}/{config.run.name}"
    existing = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_TAG}` = '{storage_tag}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if existing:
        run_id = existing[0].info.run_id
        print(f"continuing MLflow run {run_id}", flush=True)
    else:
        tags = {RUN_TAG: storage_tag}
        run_id = client.create_run(experiment_id, run_name=config.run.name, tags=tags).info.run_id
        log_config_params(run_id, config)
        with mlflow.start_run(run_id=run_id):
            _log_lineage(config, plans)
            text = redact_url(json.dumps(config.to_dict(), indent=2))
            mlflow.log_text(text, "config/train_config.json")
    client.update_run(run_id, status="RUNNING")
    return run_id


def _log_lineage(config: TrainConfig, plans: dict[str, InputPlan]) -> None:
    """Record each input as an MLflow dataset input: URL, digest and counts (a prepared split's
    digest is over its manifest's shard hashes; foreign shards' over their URLs, sizes and
    versions as listed)."""
    import hashlib

    import mlflow
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for role, url in (("train", config.data.train), ("validation", config.data.validation)):
        plan, manifest = plans[role], plans[role].manifest
        if manifest is not None:
            digest = hashlib.sha256("".join(s.sha256 for s in manifest.shards).encode()).hexdigest()
            name, images, tags = manifest.split, str(manifest.count), {"manifest_sha256": digest}
        else:
            digest, name, images, tags = plan.digest(), "webdataset", "unknown", {}
        source_uri = url if "://" in url or "{" in url else Path(url).resolve().as_uri()
        try:
            with warnings.catch_warnings():
                # MLflow registers the local artifact source twice and warns that it is ambiguous.
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(source_uri)
        except Exception:  # a scheme MLflow has no source for: the URL stays in the tags below
            source = CodeDatasetSource(tags={"url": url})
        dataset = MetaDataset(source=source, name=f"{role}:{name}", digest=digest[:16])
        mlflow.log_input(
            dataset,
            context="training" if role == "train" else "validation",
            tags={"url": url, "images": images, "shards": str(len(plan.shards)), **tags},
        )


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """Local paths made absolute: Ray workers run in other directories (and on other nodes, where
    a shared filesystem or s3:// is needed anyway)."""
    from dataclasses import replace

    def fix(url: str) -> str:
        return url if "://" in url else str(Path(url).resolve())

    return replace(
        config,
        data=replace(
            config.data, train=fix(config.data.train), validation=fix(config.data.validation)
        ),
        run=replace(config.run, storage_path=fix(config.run.storage_path)),
        workdir=fix(config.workdir),
    )


def _init_ray(config: TrainConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = config.run.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    from pipeline.local_ray import quiet_local_ray

    quiet_local_ray(config.verbose)  # Ray's lines a user cannot act on: off unless verbose
    # Ray Data excludes Train's CPUs from its own budget: give it logical CPUs of its own, or the
    # readers and the workers deadlock on a 2-core machine.
    workers_cpus = config.scaling.num_workers * config.scaling.cpus_per_worker
    # The dashboard stays on: Ray Train's placement-group cleaner asks its state API whether the
    # controller lives, and warns every few seconds when it cannot.
    ray.init(
        address="local",
        num_cpus=int(math.ceil(workers_cpus)) + 2,
        log_to_driver=True,
        # WARNING hides "Started a local Ray instance. View the dashboard at ...", as in the demo.
        logging_level=logging.INFO if config.verbose else logging.WARNING,
    )


def train(config: TrainConfig, hooks: TrainHooks | None = None) -> TrainResult:
    """Run (or resume) the training job described by `config`; see the module docstring.
    `hooks`: the test seams (pipeline.train.worker.TrainHooks), else $FLOWRAY_TEST_HOOKS's."""
    from pipeline.data.tally import SkipTally
    from pipeline.tracking.connection import resolve_tracking_uri
    from pipeline.train.worker import TrainHooks

    config = absolute_paths(config)
    local = not (config.run.address or os.environ.get("RAY_ADDRESS"))
    plans = preflight(config, local_ray=local)
    epoch = _resume_epoch(config)
    tracking_uri = resolve_tracking_uri(config.mlflow.tracking_uri, config.workdir)
    run_id = _mlflow_run(config, tracking_uri, plans)
    _init_ray(config)
    tally = SkipTally.shared() if config.data.on_error == "skip" else None
    hooks = hooks or TrainHooks.from_environment()
    trainer = _trainer(config, plans, tally, tracking_uri, run_id, epoch, hooks)
    images = f"{image_count(plans['train'])} training images"
    if plans["train"].manifest is None:
        images = f"{len(plans['train'].shards)} training shard(s) of WebDataset images"
    print(
        f"training {config.run.name}: {config.scaling.num_workers} workers x batch {config.batch_size}, "
        f"up to {config.max_steps} steps"
        + (f" or {config.max_minutes:g} minutes" if config.max_minutes else "")
        + f"; {images}, checkpoints in {config.run.storage_path}/{config.run.name}",
        flush=True,
    )
    try:
        result = _fit(trainer, config)
        return _finish(config, result, tally, tracking_uri, run_id)
    except BaseException as error:  # Ctrl-C too: the run must not stay RUNNING
        _mark_failed(
            tracking_uri, run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        )
        raise


def _resume_epoch(config: TrainConfig) -> int:
    """For a rerun with checkpoints: its config checked against the latest checkpoint's (a model
    or data change is refused, naming the keys), and the epoch it had reached; 0 for a new run."""
    from pipeline.storage import join_url
    from pipeline.train.checkpoint import check_resume, latest_saved_run

    saved = latest_saved_run(join_url(config.run.storage_path, config.run.name), config.storage)
    if saved is None:
        return 0
    check_resume(saved, config.to_dict())
    print(f"resuming {config.run.name} at step {saved.step}, epoch {saved.epoch}", flush=True)
    return saved.epoch


def _trainer(
    config: TrainConfig,
    plans: dict[str, InputPlan],
    tally: SkipTally | None,
    tracking_uri: str,
    run_id: str,
    epoch: int,
    hooks: TrainHooks,
) -> TorchTrainer:
    """The TorchTrainer: the shuffled training split as a Ray Data stream, the workers, and where
    checkpoints go (the same name and storage path resume the run)."""
    from dataclasses import asdict

    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.storage import arrow_filesystem, is_s3

    storage_path, storage_filesystem = config.run.storage_path, None
    if is_s3(storage_path):
        storage_filesystem, storage_path = arrow_filesystem(storage_path, config.storage)
    log_level = "INFO" if config.verbose else "WARNING"  # Ray Train's own lines
    return TorchTrainer(
        _loop,
        train_loop_config={
            "train": config.to_dict(),
            "tracking_uri": tracking_uri,
            "mlflow_run_id": run_id,
            "hooks": asdict(hooks),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=config.scaling.use_gpu,
            placement_strategy=config.scaling.placement_strategy,
            resources_per_worker={
                "CPU": config.scaling.cpus_per_worker,
                **({"GPU": 1} if config.scaling.use_gpu else {}),
            },
        ),
        run_config=ray.train.RunConfig(
            name=config.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=config.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=ray.train.LoggingConfig(log_level=log_level),
        ),
        datasets={"train": _training_dataset(config, plans["train"], tally, epoch)},
    )


def _training_dataset(
    config: TrainConfig, plan: InputPlan, tally: SkipTally | None, epoch: int
) -> Any:
    """The shuffled training input as a Ray Data stream of images at the model's shape, in an
    order that is a function of (seed, epoch) (pipeline.train.data_order).

    A dataset keeps the DataContext it was created under, so two settings are for this one
    alone: preserve_order keeps the blocks in that order (a resume inside an epoch skips exactly
    the batches consumed before it), and progress bars are off unless verbose (the split is read
    again every epoch, and its bars would bury the workers' own progress lines)."""
    from ray.data import DataContext

    from pipeline.data.reader import read_input
    from pipeline.train.data_order import epoch_board

    context = DataContext.get_current()
    saved = context.enable_progress_bars, context.execution_options.preserve_order
    context.enable_progress_bars, context.execution_options.preserve_order = config.verbose, True
    try:
        return read_input(
            plan,
            config.storage,
            shape=tuple(config.model.image_shape),
            on_error=config.data.on_error,
            tally=tally,
            shuffle=True,
            seed=config.seed,
            epoch_of=epoch_board(config, default=epoch),
        ).select_columns(["image"])
    finally:
        context.enable_progress_bars, context.execution_options.preserve_order = saved


def _fit(trainer: TorchTrainer, config: TrainConfig) -> Result:
    """`trainer.fit()`, with a non-finite stop left by rank 0 raised here as final (a stale one
    from an earlier attempt is removed first: the rerun with a lower lr must go on)."""
    from pipeline.storage import exists, fsspec_filesystem, join_url, read_bytes
    from pipeline.train.loop_state import NONFINITE_STOP

    marker = join_url(config.run.storage_path, config.run.name, NONFINITE_STOP)
    if exists(marker, config.storage):
        fs, path = fsspec_filesystem(marker, config.storage)
        fs.rm(path)
    result = trainer.fit()
    if exists(marker, config.storage):
        stop = read_bytes(marker, config.storage).decode()
        raise TrainingStopped(f"training {config.run.name} stopped: {stop}")
    if result.checkpoint is None:
        raise RuntimeError(f"training {config.run.name} finished without a checkpoint")
    return result


def _mark_failed(tracking_uri: str, run_id: str, status: str) -> None:
    """The MLflow run ends FAILED (KILLED on Ctrl-C); an MLflow that does not answer costs one
    line, never the error that is on its way up."""
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri).set_terminated(run_id, status=status)
    except Exception as error:
        print(
            f"MLflow run {run_id} not marked {status}: {type(error).__name__}: {error}", flush=True
        )


def _finish(
    config: TrainConfig, result: Result, tally: SkipTally | None, tracking_uri: str, run_id: str
) -> TrainResult:
    """From the last checkpoint: the final figures, the EMA model logged and registered (promoted
    to champion when better), the MLflow run closed."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.registry import register_flow
    from pipeline.train.checkpoint import load_checkpoint

    with result.checkpoint.as_directory() as directory:
        _, ema_flow, state = load_checkpoint(Path(directory))
    # The last step's evaluation (the reported metrics carry it exactly when the history does).
    last = [bpd for step, bpd in state.history["validation"] if step == state.step]
    val_bpd = last[-1] if last else math.nan
    skipped = tally.total() if tally is not None else 0
    client = MlflowClient(tracking_uri)
    rates = [m.value for m in client.get_metric_history(run_id, "images_per_second")]
    rate = statistics.median_high(rates) if rates else math.nan
    model_uri = _log_final(config, tracking_uri, run_id, ema_flow, state, val_bpd, skipped)
    calibration = _calibration(config, ema_flow)
    promotion = register_flow(
        model_uri, config.mlflow.registered_model, val_bpd, run_id, calibration
    )
    client.set_tag(run_id, "model_version", promotion.version)
    client.set_tag(run_id, "champion_decision", promotion.reason)
    client.set_terminated(run_id, status="FINISHED")
    return TrainResult(
        steps=state.step,
        val_bits_per_dim=val_bpd,
        mlflow_run_id=run_id,
        model_name=config.mlflow.registered_model,
        model_version=promotion.version,
        promoted=promotion.promoted,
        promotion_reason=promotion.reason,
        checkpoint_path=result.checkpoint.path,
        skipped_images=skipped,
        images_per_second=rate,
    )


def _calibration(config: TrainConfig, ema_flow: Flow) -> Any:
    """The EMA flow's calibration on (the first 10,000 images of) the validation split, stored
    with the version (pipeline.model.calibration); None, with a warning, when the split cannot
    be read now: the version is registered without it."""
    from pipeline.model.calibration import calibrate_flow
    from pipeline.train.worker import decoded_rows

    url = config.data.validation
    try:
        rows = decoded_rows(config, url)
        return calibrate_flow(ema_flow, rows, config.eval_seed, 1, source={"data": redact_url(url)})
    except (FlowrayError, OSError, ValueError) as error:
        logging.getLogger(__name__).warning(
            "no calibration for this version (%s: %s); `flowray models calibrate` adds it",
            type(error).__name__,
            error,
        )
        return None


def _log_final(
    config: TrainConfig,
    tracking_uri: str,
    run_id: str,
    ema_flow: Flow,
    state: TrainState,
    val_bpd: float,
    skipped: int,
) -> str:
    """Final metrics, the bits/dim curves (also under <workdir>/pictures) and the EMA model on
    the run; returns the logged model's URI."""
    import mlflow
    import numpy as np
    from PIL import Image

    from pipeline.plots import training_curves
    from pipeline.tracking.registry import log_flow_model

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(
            {"final_val_bits_per_dim": val_bpd, "skipped_images": skipped}, step=state.step
        )
        curve = training_curves(
            state.history["train"], state.history["validation"], f"{config.run.name}: bits/dim"
        )
        pixels = np.asarray(Image.open(io.BytesIO(curve)).convert("RGB"))
        mlflow.log_image(pixels, "curves/bits_per_dim.png")
        if "://" not in config.workdir:  # also beside the other local outputs
            pictures = Path(config.workdir) / "pictures"
            pictures.mkdir(parents=True, exist_ok=True)
            (pictures / f"{config.run.name}-bits_per_dim.png").write_bytes(curve)
        return log_flow_model(ema_flow).model_uri


def _loop(loop_config: dict[str, Any]) -> None:
    # Imported inside the worker so the driver does not pay for it and Ray pickles a small function.
    from pipeline.train.worker import train_loop_per_worker

    train_loop_per_worker(loop_config)
