"""The Ray Train worker loop: data shards, DDP, checkpoints and MLflow around the Ray-free
training core (`pipeline.train.core`). It restores (or initialises) the flow, its EMA and
optimizer on this worker's device, then runs epochs over this worker's shard; after each step,
progress, evaluation (rank 0: the EMA weights' validation bits/dim, a sample grid) and a
checkpoint when they fall due. Every worker calls `ray.train.report` equally often (a barrier in
Ray Train V2); rank 0 attaches the checkpoint.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from flowmodel import Flow, build_flow
from flowmodel.typed import from_dict
from pipeline.storage import exists, join_url, write_bytes_atomic
from pipeline.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from pipeline.train.config import TrainConfig
from pipeline.train.core import Training, run_step, start_training
from pipeline.train.data_order import epoch_board, record_batch
from pipeline.train.distributed import check_identical_start, is_distributed, slowest
from pipeline.train.loop_state import (
    NONFINITE_STOP,
    LoopState,
    NonFiniteLoss,
    eta_seconds,
    record_outcome,
    settle,
)
from pipeline.train.reporting import (
    RunLogger,
    format_eta,
    quiet_ray_train_reports,
    sample_grid,
    say,
    start_system_metrics,
    stop_system_metrics,
)
from pipeline.train.step import StepMetrics, budget_progress, evaluate

if TYPE_CHECKING:
    from pipeline.data.inputs import InputPlan

HOOKS_VARIABLE = "FLOWRAY_TEST_HOOKS"


T = TypeVar("T")


@dataclass(frozen=True)
class TrainHooks:
    """Seams that tests inject into a run: never part of its TrainConfig, so never in
    --print-config, MLflow params or checkpoints. A test passes them to `driver.train(config,
    hooks)`, or, for a job started as a process (`flowray submit --env`), as JSON in
    $FLOWRAY_TEST_HOOKS of the driver: `{"hold_at_step": 10}`.

    Attributes:
        fail_at_step: the last worker exits abruptly once at this step, like a lost node (a
            marker file in the run's folder keeps the retried worker group from dying again).
        hold_at_step: after this step's checkpoint, every worker waits until
            <run.storage_path>/<run.name>/release-hold exists (a test kills a node at a known
            step).
        record_batches: each worker appends "<step> <epoch> <batch of epoch> <digest of the
            batch> <pid>" per step to <run>/batches-rank<r>.log (local run storage), to check the
            data order on resume.
    """

    fail_at_step: int | None = None
    hold_at_step: int | None = None
    record_batches: bool = False

    @classmethod
    def from_environment(cls) -> TrainHooks:
        """The hooks in $FLOWRAY_TEST_HOOKS (none when it is unset)."""
        text = os.environ.get(HOOKS_VARIABLE, "").strip()
        return from_dict(cls, json.loads(text)) if text else cls()


@dataclass(frozen=True)
class _Worker:
    config: TrainConfig
    config_dict: dict[str, Any]  # what `config` came from: stored in checkpoints
    rank: int
    world: int
    logger: RunLogger  # active on rank 0 only
    hooks: TrainHooks = field(default_factory=TrainHooks)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def run_file(self, name: str) -> str:
        return join_url(self.config.run.storage_path, self.config.run.name, name)


@dataclass
class _Clock:
    """Wall time of the step loop (`base`: seconds of this run's earlier attempts), and the
    logging window's steps, start and data wait (time blocked on the data iterator)."""

    base: float = 0.0
    started: float = field(default_factory=time.monotonic)
    window_start: float = field(default_factory=time.monotonic)
    window_steps: int = 0
    window_wait: float = 0.0


def decoded_rows(
    config: TrainConfig, data: InputPlan | str, on_error: str = "skip"
) -> Iterator[dict[str, Any]]:
    """The rows of any input (a prepared split or foreign shards), fitted to the model's shape."""
    from pipeline.data.reader import iter_input
    from pipeline.data.tally import SkipTally

    shape = tuple(config.model.image_shape)
    return iter_input(data, config.storage, shape=shape, on_error=on_error, tally=SkipTally())


def _validation_batches(config: TrainConfig) -> Iterator[tuple[list[str], torch.Tensor]]:
    rows = decoded_rows(config, config.data.validation, config.data.on_error)
    rows = itertools.islice(rows, config.data.validation_limit)
    while batch := list(itertools.islice(rows, config.eval_batch_size)):
        yield [row["key"] for row in batch], torch.from_numpy(np.stack([r["image"] for r in batch]))


def _init_batch(config: TrainConfig) -> torch.Tensor:
    """The first `init_images` training images in input order: the same on every worker."""
    rows = decoded_rows(config, config.data.train, config.data.on_error)
    rows = itertools.islice(rows, config.init_images)
    return torch.from_numpy(np.stack([row["image"] for row in rows]))


def _maybe_inject_fault(worker: _Worker, step: int) -> None:
    config, rank = worker.config, worker.rank
    if step != worker.hooks.fail_at_step or rank != worker.world - 1:
        return
    marker = worker.run_file("fault-injected")
    if exists(marker, config.storage):
        return
    write_bytes_atomic(marker, f"worker {rank} killed at step {step}\n".encode(), config.storage)
    say(f"[fault injection] worker {rank} exits at step {step}")
    os._exit(1)


HOLD_POLL_SECONDS = 0.5
HOLD_LIMIT_SECONDS = 1800.0


def _maybe_hold(worker: _Worker, step: int) -> None:
    if step != worker.hooks.hold_at_step:
        return
    marker = worker.run_file("release-hold")
    if worker.is_chief:
        say(f"holding at step {step} until {marker} exists")
    deadline = time.monotonic() + HOLD_LIMIT_SECONDS
    while not exists(marker, worker.config.storage):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"hold_at_step={step}: {marker} did not appear in {HOLD_LIMIT_SECONDS:.0f} s"
            )
        time.sleep(HOLD_POLL_SECONDS)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker; `loop_config` holds the TrainConfig as a dict
    ("train"), the MLflow tracking URI and run id, and the test hooks ("hooks")."""
    import ray.train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    worker = _Worker(
        config=TrainConfig.from_dict(loop_config["train"]),
        config_dict=loop_config["train"],
        rank=rank,
        world=context.get_world_size(),
        logger=RunLogger(
            loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id"), rank == 0
        ),
        hooks=from_dict(TrainHooks, loop_config.get("hooks") or {}),
    )
    quiet_ray_train_reports(worker.config.verbose)
    # Rank 0's machine is where training runs (the driver may be a laptop submitting a job).
    monitor = (
        start_system_metrics(loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id"))
        if worker.is_chief
        else None
    )
    try:
        torch.manual_seed(worker.config.seed)
        training, state = _restore_or_init(worker, ray.train.get_checkpoint())
        _step_loop(worker, training, state)
    except NonFiniteLoss as stop:
        # Ray Train retries every raised error, and a retry would resume into the same
        # divergence. So the workers (all stopped at the same step) return normally, and rank 0
        # leaves the reason in the run's folder, where the driver raises it as final after fit().
        if worker.is_chief:
            say(f"stopped: {stop}")
            write_bytes_atomic(
                worker.run_file(NONFINITE_STOP), str(stop).encode(), worker.config.storage
            )
    finally:
        stop_system_metrics(monitor)
        worker.logger.close()  # what is still queued goes out (or is counted) before the loop ends


def _ddp(flow: Flow) -> torch.nn.Module:
    """The flow wrapped for data-parallel training (unwrapped for one worker), without DDP's
    buffer sync before every forward: the flow's buffers never change after the identical start
    that `check_identical_start` verifies, and each sync makes the workers wait for each other."""
    import inspect

    import ray.train.torch

    ddp_options = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    # Newer torch calls it forward_sync_buffers and warns on broadcast_buffers; older has only that.
    key = "forward_sync_buffers" if "forward_sync_buffers" in ddp_options else "broadcast_buffers"
    return ray.train.torch.prepare_model(flow, parallel_strategy_kwargs={key: False})


def _restore_or_init(worker: _Worker, checkpoint: Any) -> tuple[Training, LoopState]:
    """The model, EMA, optimizer and counters on this worker's device: the latest checkpoint's,
    or a new flow initialised from the same images and seed on every worker. Every worker's start
    is checked to be identical before DDP would make it so by broadcasting rank 0's."""
    import ray.train.torch

    config, device = worker.config, ray.train.torch.get_device()
    restored: tuple[Flow, TrainState] | None = None
    if checkpoint is None:
        flow = build_flow(config.model)
        flow.initialize(_init_batch(config), generator=torch.Generator().manual_seed(config.seed))
    else:
        with checkpoint.as_directory() as directory:
            flow, ema_flow, saved = load_checkpoint(Path(directory))
        flow.train()
        restored = (ema_flow, saved)
        if worker.is_chief:
            say(f"resuming from checkpoint at step {saved.step}")
    flow = flow.to(device)  # with one worker too: prepare_model only moves (and wraps) for several
    checksums = check_identical_start(flow, device)
    training = start_training(
        flow, config, device, rank=worker.rank, wrap=_ddp, restored=restored, say=say
    )
    state = LoopState()
    if restored is not None:
        state = LoopState.resumed(saved)
        torch.set_rng_state(saved.rng)
    elif worker.is_chief:
        worker.logger.metrics({f"init_checksum_rank{r}": c for r, c in enumerate(checksums)}, 0)
    if worker.is_chief:
        say(f"device {device}, precision {worker.config.precision}; {training.loss.note}")
    return training, state


def _step_loop(worker: _Worker, training: Training, state: LoopState) -> None:
    """Epochs over this worker's shard until max_steps or max_minutes."""
    import ray.train

    config = worker.config
    shard = ray.train.get_dataset_shard("train")
    clock = _Clock(base=state.elapsed_seconds)
    done = state.step >= config.max_steps
    if done and not state.evaluated_at_step():
        # Resumed at the end from a checkpoint taken between evaluations: the last step still
        # needs its validation figure (registration refuses a run without one).
        if worker.is_chief:
            _evaluate(worker, training, state, final=True)
        _checkpoint_and_report(worker, training, state)
    board = epoch_board(config)
    while not done:
        if worker.is_chief:  # before asking for the epoch's first batch: see data_order
            board.announce(state.epoch)
        # A resume inside an epoch skips the batches of it consumed before (same order).
        resume_at, epoch_batches = state.epoch_step, 0
        batches = shard.iter_torch_batches(
            batch_size=config.batch_size,
            drop_last=True,
            local_shuffle_buffer_size=config.data.shuffle_buffer or None,
            local_shuffle_seed=config.seed + state.epoch,
            device=training.device,
            pin_memory=training.device.type == "cuda",  # an asynchronous copy to the GPU
        )
        for batch in _timing_waits(batches, clock):
            epoch_batches += 1
            if epoch_batches <= resume_at:
                continue
            if worker.hooks.record_batches:
                record_batch(config, worker.rank, state, batch["image"])
            state.epoch_step += 1  # consumed, whatever the step does with it
            done = _step_and_duties(worker, training, state, clock, batch["image"])
            if done:
                break
        else:  # a finished pass
            state.epoch, state.epoch_step = state.epoch + 1, 0
        if epoch_batches == 0:
            raise ValueError(
                f"the training split {config.data.train} gives no full batch of {config.batch_size} "
                f"images per worker ({worker.world} workers): use more images or a smaller batch_size"
            )


def _timing_waits(batches: Iterable[T], clock: _Clock) -> Iterator[T]:
    """`batches`, adding the time spent waiting for each to the clock's window (the time between
    yields is the consumer's, and does not count)."""
    iterator = iter(batches)
    while True:
        asked = time.monotonic()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        clock.window_wait += time.monotonic() - asked
        yield batch


def _step_and_duties(
    worker: _Worker, training: Training, state: LoopState, clock: _Clock, images: torch.Tensor
) -> bool:
    """One training step, then whatever falls due: progress, evaluation, checkpoint. Returns
    whether the run is done (every worker agrees, so all of them stop at the same step)."""
    config = worker.config
    _maybe_inject_fault(worker, state.step)
    # From the agreed elapsed time: the same learning rate everywhere.
    progress = budget_progress(
        state.step, config.max_steps, state.elapsed_seconds, config.max_minutes
    )
    record_outcome(state, run_step(training, config, images, state.step, progress))
    lr = training.optimizer.param_groups[0]["lr"]
    clock.window_steps += 1

    # The step's figures stay on the device until a read (`settle`), at the same steps on every
    # worker: every sync_every steps, at every log, evaluation and checkpoint, and the last step.
    cadences = (config.sync_every, config.log_every, config.eval_every, config.checkpoint_every)
    read = state.step >= config.max_steps or any(state.step % every == 0 for every in cadences)
    # Before another step, every worker takes the slowest clock (the same schedule, the same last
    # step). That all-reduce reads the device, so with several workers it runs at reads only.
    elapsed = clock.base + time.monotonic() - clock.started
    done = state.step >= config.max_steps
    if not done and (read or not is_distributed()):
        elapsed = slowest(elapsed, training.device)
        done = config.max_minutes is not None and elapsed > 60 * config.max_minutes
        state.elapsed_seconds = elapsed
    if done:
        state.elapsed_seconds = elapsed
    global_batch = config.batch_size * worker.world
    limit = config.max_nonfinite_steps
    metrics = settle(state, global_batch=global_batch, max_skipped=limit) if read or done else None
    if metrics is not None and (state.step % config.log_every == 0 or done):
        _log_progress(worker, state, clock, metrics, lr, elapsed)
    if worker.is_chief and (state.step % config.eval_every == 0 or done):
        _evaluate(worker, training, state, final=done)
    if state.step % config.checkpoint_every == 0 or done:
        _checkpoint_and_report(worker, training, state)
    _maybe_hold(worker, state.step)
    return done


def _log_progress(
    worker: _Worker,
    state: LoopState,
    clock: _Clock,
    metrics: StepMetrics,
    lr: float,
    elapsed: float,
) -> None:
    """Training metrics of the window since the last log line; then a new window starts."""
    config = worker.config
    window = time.monotonic() - clock.window_start
    rate = clock.window_steps * config.batch_size * worker.world / max(window, 1e-9)
    pace = window / max(clock.window_steps, 1)
    wait = clock.window_wait / max(window, 1e-9)
    eta = eta_seconds(config.max_steps - state.step, pace, elapsed, config.max_minutes)
    worker.logger.metrics(
        {
            "train_bits_per_dim": metrics.bits_per_dim,
            "images_per_second": rate,
            "learning_rate": lr,
            "grad_norm": metrics.grad_norm,
            "skipped_steps": state.skipped_steps,
            "data_wait_fraction": wait,
        },
        state.step,
    )
    if worker.is_chief:
        say(
            f"step {state.step}/{config.max_steps} | {metrics.bits_per_dim:.3f} bits/dim | "
            f"{rate:.0f} img/s | data wait {wait:.0%} | lr {lr:.2e} | "
            f"skipped {state.skipped_steps} | ETA {format_eta(eta)}"
        )
    # After the MLflow write, so that its time counts in neither window.
    clock.window_start, clock.window_steps, clock.window_wait = time.monotonic(), 0, 0.0


def _evaluate(worker: _Worker, training: Training, state: LoopState, final: bool) -> None:
    """Rank 0: validation bits/dim of the EMA weights, logged with a sample grid. The final
    evaluation must see images: the model is registered with its figure."""
    config, step, flow = worker.config, state.step, training.ema.model
    result = evaluate(flow, _validation_batches(config), seed=config.eval_seed)
    mean, count = result.mean, result.count
    if count == 0 and final:
        raise ValueError(
            f"data.validation ({config.data.validation}): expected at least one image for the "
            f"final evaluation at step {step}, found none that could be read"
        )
    state.history["validation"].append([step, mean])
    state.val_bits_per_dim, state.last_eval_step = mean, step
    metrics = {
        "val_bits_per_dim": mean,
        "val_images": count,
        "val_nonfinite_images": result.nonfinite,
    }
    if result.nonfinite:  # the mean is then inf, which MLflow cannot hold
        metrics["val_bits_per_dim_finite"] = result.finite_mean
    worker.logger.metrics(metrics, step)
    worker.logger.image(sample_grid(flow, config.sample_temperature, step), "samples", step)
    line = f"step {step}: validation {mean:.4f} bits/dim on {count} images"
    if result.nonfinite:
        line += (
            f" ({result.nonfinite} with non-finite bits/dim; {result.finite_mean:.4f} over the "
            "others: see docs/model.md, where the model can overflow)"
        )
    say(line)


def _checkpoint_and_report(worker: _Worker, training: Training, state: LoopState) -> None:
    """Every worker reports; rank 0 attaches the checkpoint of this step."""
    import ray.train

    state.last_checkpoint_step = state.step
    metrics = state.report_metrics()
    if not worker.is_chief:
        ray.train.report(metrics, checkpoint=None)
        return
    saved = state.saved(
        training.optimizer.state_dict(), torch.get_rng_state(), training.ema.updates
    )
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), training.flow, training.ema.model, saved, worker.config_dict)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
