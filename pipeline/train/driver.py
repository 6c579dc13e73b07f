"""`flowray train` on the driver: preflight checks, MLflow run and lineage, the Ray TorchTrainer,
then the logged, registered model.

    result = train(load_config(TrainConfig, "fashion-mnist", ["max_steps=500"]))

Rerunning with the same run name and storage path resumes from the latest checkpoint (Ray Train V2
restores it through `get_checkpoint()`) and continues the same MLflow run.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import FlowrayError
from pipeline.storage import redact_url
from pipeline.train.config import TrainConfig

if TYPE_CHECKING:
    from ray.train import Result
    from ray.train.torch import TorchTrainer

    from flowmodel import Flow
    from pipeline.data.reader import SkipTally
    from pipeline.train.checkpoint import TrainState

__all__ = ["PreflightError", "TrainResult", "TrainingStopped", "preflight", "train"]

RUN_TAG = "flowray.run_name"
READ_PLANS_PER_EPOCH = 2  # get_read_tasks calls per pass of Ray Train's streaming split


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


def preflight(config: TrainConfig, local_ray: bool) -> dict[str, Any]:
    """Check data and resources before Ray starts. Returns the two manifests."""
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

    manifests = {
        "train": _checked_manifest(config, "train", config.data.train),
        "validation": _checked_manifest(config, "validation", config.data.validation),
    }
    needed = config.batch_size * config.scaling.num_workers
    if manifests["train"].count < needed:
        raise PreflightError(
            f"data.train has {manifests['train'].count} images, fewer than one global batch "
            f"({config.batch_size} x {config.scaling.num_workers} workers = {needed})"
        )
    # Registration refuses a NaN validation figure: find out now, not after the whole run.
    usable = _readable_images(config.data.validation, manifests["validation"], config.storage)
    if usable == 0:
        raise PreflightError(
            f"data.validation ({config.data.validation}): expected at least one image, found "
            f"{manifests['validation'].count} in the manifest and {usable} in shards that can "
            "be read whole",
            hint="prepare the validation split again, or point data.validation at another split",
        )
    return manifests


def _checked_manifest(config: TrainConfig, role: str, url: str) -> Any:
    """The split's manifest, its image shape checked against the model's. Under skip a shard that
    disagrees with the manifest is left out by the reader, so only fail checks the shards here."""
    from pipeline.data.shards import load_manifest

    manifest = load_manifest(url, config.storage, check_shards=config.data.on_error == "fail")
    if tuple(manifest.shape) != tuple(config.model.image_shape):
        raise PreflightError(
            f"data.{role}: images are {list(manifest.shape)} (C, H, W) but model.image_shape is "
            f"{list(config.model.image_shape)}",
            hint="set model.image_shape to the data's shape, or prepare the data at the model's size",
        )
    return manifest


def _readable_images(url: str, manifest: Any, storage: Any) -> int:
    """Images in the shards that are present with the manifest's size (the others are skipped)."""
    from pipeline.data.manifest import compare_shards
    from pipeline.storage import list_files

    diff = compare_shards(manifest, list_files(url, storage))
    bad = set(diff.missing) | {name for name, _, _ in diff.wrong_size}
    return sum(info.count for info in manifest.shards if info.name not in bad)


def _mlflow_run(config: TrainConfig, tracking_uri: str, manifests: dict[str, Any]) -> str:
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
        client.update_run(run_id, status="RUNNING")
        print(f"continuing MLflow run {run_id}", flush=True)
        return run_id
    run = client.create_run(experiment_id, run_name=config.run.name, tags={RUN_TAG: storage_tag})
    run_id = run.info.run_id
    log_config_params(run_id, config)
    with mlflow.start_run(run_id=run_id):
        _log_lineage(config, manifests)
        mlflow.log_text(
            redact_url(json.dumps(config.to_dict(), indent=2)), "config/train_config.json"
        )
    client.update_run(run_id, status="RUNNING")
    return run_id


def _log_lineage(config: TrainConfig, manifests: dict[str, Any]) -> None:
    """Record each split as an MLflow dataset input: URL, manifest digest and counts."""
    import hashlib

    import mlflow
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for role, url in (("train", config.data.train), ("validation", config.data.validation)):
        manifest = manifests[role]
        digest = hashlib.sha256("".join(s.sha256 for s in manifest.shards).encode()).hexdigest()
        source_uri = url if "://" in url else Path(url).resolve().as_uri()
        try:
            with warnings.catch_warnings():
                # MLflow registers the local artifact source twice and warns that it is ambiguous.
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(source_uri)
        except Exception:  # a scheme MLflow has no source for: the URL stays in the tags below
            source = CodeDatasetSource(tags={"url": url})
        dataset = MetaDataset(source=source, name=f"{role}:{manifest.split}", digest=digest[:16])
        mlflow.log_input(
            dataset,
            context="training" if role == "train" else "validation",
            tags={
                "url": url,
                "images": str(manifest.count),
                "shards": str(len(manifest.shards)),
                "manifest_sha256": digest,
            },
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
    # Ray Data excludes Train's CPUs from its own budget: give it logical CPUs of its own, or the
    # readers and the workers deadlock on a 2-core machine.
    workers_cpus = config.scaling.num_workers * config.scaling.cpus_per_worker
    # The dashboard stays on: Ray Train's placement-group cleaner asks its state API whether the
    # controller lives, and warns every few seconds when it cannot.
    ray.init(address="local", num_cpus=int(math.ceil(workers_cpus)) + 2, log_to_driver=True)


def _storage_args(config: TrainConfig) -> tuple[str, Any]:
    from pipeline.storage import arrow_filesystem, is_s3

    if is_s3(config.run.storage_path):
        filesystem, path = arrow_filesystem(config.run.storage_path, config.storage)
        return path, filesystem
    return config.run.storage_path, None


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) the training job described by `config`; see the module docstring."""
    from pipeline.data.reader import SkipTally
    from pipeline.tracking.connection import resolve_tracking_uri

    config = absolute_paths(config)
    local = not (config.run.address or os.environ.get("RAY_ADDRESS"))
    manifests = preflight(config, local_ray=local)
    epoch = _resume_epoch(config)
    tracking_uri = resolve_tracking_uri(config.mlflow.tracking_uri, config.workdir)
    run_id = _mlflow_run(config, tracking_uri, manifests)
    _init_ray(config)
    tally = SkipTally.shared() if config.data.on_error == "skip" else None
    trainer = _trainer(config, manifests, tally, tracking_uri, run_id, epoch)
    print(
        f"training {config.run.name}: {config.scaling.num_workers} workers x batch {config.batch_size}, "
        f"up to {config.max_steps} steps"
        + (f" or {config.max_minutes:g} minutes" if config.max_minutes else "")
        + f"; {manifests['train'].count} training images, checkpoints in {config.run.storage_path}/{config.run.name}",
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
    from pipeline.train.resume import check_resume, latest_saved_run

    saved = latest_saved_run(join_url(config.run.storage_path, config.run.name), config.storage)
    if saved is None:
        return 0
    check_resume(saved, config.to_dict())
    print(f"resuming {config.run.name} at step {saved.step}, epoch {saved.epoch}", flush=True)
    return saved.epoch


def _trainer(
    config: TrainConfig,
    manifests: dict[str, Any],
    tally: SkipTally | None,
    tracking_uri: str,
    run_id: str,
    epoch: int = 0,
) -> TorchTrainer:
    """The TorchTrainer: the shuffled training split as a Ray Data stream, the workers, and where
    checkpoints go (the same name and storage path resume the run)."""
    import ray.train
    from ray.data import DataContext
    from ray.train.torch import TorchTrainer

    # The training split is read again every epoch; Ray Data's progress bars for it (drawn by
    # its SplitCoordinator, one set per epoch) would bury the workers' own progress lines. A
    # dataset keeps the DataContext it was created under, so they are off for this one alone.
    context = DataContext.get_current()
    bars, context.enable_progress_bars = context.enable_progress_bars, config.verbose
    try:
        dataset = _training_dataset(config, manifests, tally, epoch)
    finally:
        context.enable_progress_bars = bars
    storage_path, storage_filesystem = _storage_args(config)
    return TorchTrainer(
        _loop,
        train_loop_config={
            "train": config.to_dict(),
            "tracking_uri": tracking_uri,
            "mlflow_run_id": run_id,
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
        ),
        datasets={"train": dataset},
    )


def _training_dataset(
    config: TrainConfig, manifests: dict[str, Any], tally: SkipTally | None, epoch: int
) -> Any:
    """The shuffled training split as a Ray Data stream of images."""
    from pipeline.data.reader import read_split

    return read_split(
        config.data.train,
        config.storage,
        on_error=config.data.on_error,
        tally=tally,
        shuffle=True,
        # pipeline.data.ray_source draws each shard order with seed + (its count of read
        # plans), and Ray Data (2.x, streaming_split) plans the read twice per epoch: starting
        # the count at 2 x epoch makes a resume at epoch e continue the uninterrupted sequence
        # (tests/pipeline/train/test_resume.py checks this against Ray).
        seed=config.seed + READ_PLANS_PER_EPOCH * epoch,
        manifest=manifests["train"],
    ).select_columns(["image"])


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
    validation = [v for v in state.history["validation"] if v[0] == state.step]
    val_bpd = (
        validation[-1][1] if validation else float(result.metrics.get("val_bits_per_dim", math.nan))
    )
    skipped = tally.total() if tally is not None else 0
    client = MlflowClient(tracking_uri)
    rates = [m.value for m in client.get_metric_history(run_id, "images_per_second")]
    rate = sorted(rates)[len(rates) // 2] if rates else math.nan
    model_uri = _log_final(config, tracking_uri, run_id, ema_flow, state, val_bpd, skipped)
    promotion = register_flow(model_uri, config.mlflow.registered_model, val_bpd, run_id)
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
        mlflow.log_image(_png_to_array(curve), "curves/bits_per_dim.png")
        if "://" not in config.workdir:  # also beside the other local outputs
            pictures = Path(config.workdir) / "pictures"
            pictures.mkdir(parents=True, exist_ok=True)
            (pictures / f"{config.run.name}-bits_per_dim.png").write_bytes(curve)
        return log_flow_model(ema_flow).model_uri


def _png_to_array(data: bytes) -> Any:
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _loop(loop_config: dict[str, Any]) -> None:
    # Imported inside the worker so the driver does not pay for it and Ray pickles a small function.
    from pipeline.train.worker import train_loop_per_worker

    train_loop_per_worker(loop_config)
