"""The Ray Train worker loop: wires data shards, DDP, checkpoints and MLflow around `train_step`.

Each worker runs `train_loop_per_worker(loop_config)`. Rank 0 alone evaluates, logs to MLflow,
draws sample grids and writes checkpoints; every worker calls `ray.train.report` the same number of
times (it is a barrier in Ray Train V2).
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from flowmodel import Flow, build_flow
from pipeline.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from pipeline.train.config import TrainConfig
from pipeline.train.step import evaluate_bits_per_dim, train_step, unwrap

__all__ = ["EMA", "train_loop_per_worker"]


class EMA:
    """Polyak average of a flow's parameters, with the usual warm-up: the decay used at update t is
    min(decay, (1 + t) / (10 + t)), so short runs are not dominated by the random start."""

    def __init__(self, flow: Flow, decay: float, updates: int = 0) -> None:
        self.model = copy.deepcopy(flow).eval()
        self.decay = decay
        self.updates = updates
        for param in self.model.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, flow: Flow) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.decay else 0.0
        for average, current in zip(self.model.parameters(), flow.parameters()):
            average.lerp_(current.detach(), 1 - decay)
        for average, current in zip(self.model.buffers(), flow.buffers()):
            average.copy_(current)


def _all_agree(flag: bool, op: Any) -> bool:
    """Combine a boolean over all workers (MIN = all true, MAX = any true)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(tensor, op=op)
    return bool(tensor.item())


def _param_checksum(flow: Flow) -> float:
    return float(
        sum(p.detach().double().sum() for p in flow.state_dict().values() if p.is_floating_point())
    )


def _check_identical_start(flow: Flow) -> list[float]:
    """All-gather each worker's parameter checksum after initialisation; they must be equal."""
    checksum = _param_checksum(flow)
    if not (dist.is_available() and dist.is_initialized()):
        return [checksum]
    gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.tensor([checksum], dtype=torch.float64))
    sums = [float(t.item()) for t in gathered]
    if max(sums) - min(sums) > 1e-9 * max(1.0, abs(sums[0])):
        raise RuntimeError(f"workers start from different parameters (checksums {sums})")
    return sums


def _validation_batches(config: TrainConfig) -> Iterator[tuple[list[str], torch.Tensor]]:
    from pipeline.data.reader import SkipTally, iter_split

    rows = iter_split(
        config.data.validation, config.storage, on_error=config.data.on_error, tally=SkipTally()
    )
    keys: list[str] = []
    images: list[np.ndarray] = []
    for row in itertools.islice(rows, config.data.validation_limit):
        keys.append(row["key"])
        images.append(row["image"])
        if len(keys) == config.eval_batch_size:
            yield keys, torch.from_numpy(np.stack(images))
            keys, images = [], []
    if keys:
        yield keys, torch.from_numpy(np.stack(images))


def _init_batch(config: TrainConfig) -> torch.Tensor:
    """The first `init_images` training images in manifest order: the same on every worker."""
    from pipeline.data.reader import SkipTally, iter_split

    images = []
    for row in iter_split(
        config.data.train, config.storage, on_error=config.data.on_error, tally=SkipTally()
    ):
        images.append(row["image"])
        if len(images) == config.init_images:
            break
    return torch.from_numpy(np.stack(images))


class _Logger:
    """Rank 0's MLflow writes, batched; a no-op elsewhere."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, active: bool) -> None:
        self.client = None
        self.run_id = run_id
        if active and tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri)

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step) for k, v in values.items() if math.isfinite(float(v))
        ]
        self.client.log_batch(self.run_id, metrics=batch)

    def artifact_bytes(self, data: bytes, path: str) -> None:
        if self.client is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(path).name
            local.write_bytes(data)
            self.client.log_artifact(self.run_id, str(local), str(Path(path).parent))


def _sample_grid(flow: Flow, temperature: float, step: int) -> bytes:
    from pipeline.plots import image_grid, png_bytes

    images = flow.sample(64, temperature=temperature, generator=torch.Generator().manual_seed(step))
    return png_bytes(image_grid(images.numpy(), columns=8), scale=3)


def _set_lr(optimizer: torch.optim.Optimizer, config: TrainConfig, step: int) -> float:
    warmup = config.optim.warmup_steps
    lr = config.optim.lr * min(1.0, (step + 1) / warmup) if warmup else config.optim.lr
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _make_optimizer(params: Any, config: TrainConfig) -> torch.optim.Optimizer:
    kind = torch.optim.Adamax if config.optim.optimizer == "adamax" else torch.optim.Adam
    return kind(params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)


def _fault_marker(config: TrainConfig) -> str:
    from pipeline.storage import join_url

    return join_url(config.run.storage_path, config.run.name, "fault-injected")


def _maybe_inject_fault(config: TrainConfig, step: int, rank: int, world: int) -> None:
    """Test-only: the last worker exits abruptly once, at `fail_at_step`, like a lost node."""
    if config.fail_at_step is None or step != config.fail_at_step or rank != world - 1:
        return
    from pipeline.storage import exists, write_bytes_atomic

    marker = _fault_marker(config)
    if exists(marker, config.storage):
        return
    write_bytes_atomic(marker, f"worker {rank} killed at step {step}\n".encode(), config.storage)
    _say(f"[fault injection] worker {rank} exits at step {step}")
    os._exit(1)


def _say(message: str) -> None:
    """One line to the driver. Ray Train V2 turns a worker's print() into a log record and, when
    sys.stdout is wrapped (as MLflow's import does), also tees it, so each line showed twice;
    writing to the real stdout gives Ray's log forwarding exactly one copy."""
    print(message, file=sys.__stdout__, flush=True)


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    config = TrainConfig.from_dict(loop_config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    is_chief = rank == 0
    logger = _Logger(loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id"), is_chief)
    torch.manual_seed(config.seed)

    checkpoint = ray.train.get_checkpoint()
    state: TrainState | None = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            flow, ema_flow, state = load_checkpoint(Path(directory))
        flow.train()
        if is_chief:
            _say(f"resuming from checkpoint at step {state.step}")
    else:
        flow = build_flow(config.model)
        # Same seed and same images on every worker; DDP then broadcasts rank 0's weights anyway.
        flow.initialize(_init_batch(config), generator=torch.Generator().manual_seed(config.seed))
        ema_flow = flow
    checksums = _check_identical_start(flow)

    ema = EMA(ema_flow, config.optim.ema_decay, updates=state.step if state else 0)
    model = ray.train.torch.prepare_model(flow) if world > 1 else flow
    optimizer = _make_optimizer(model.parameters(), config)
    step, images_seen, skipped_total = 0, 0, 0
    history: dict[str, list[list[float]]] = {"train": [], "validation": []}
    if state is not None:
        optimizer.load_state_dict(state.optimizer)
        step, images_seen, skipped_total = state.step, state.images_seen, state.skipped_steps
        history = state.history
        torch.set_rng_state(state.rng)
    elif is_chief:
        logger.metrics({f"init_checksum_rank{r}": c for r, c in enumerate(checksums)}, 0)

    # Each worker draws its own dequantization noise.
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank + step)
    device = next(model.parameters()).device
    shard = ray.train.get_dataset_shard("train")
    started = time.monotonic()
    window_start, window_steps = time.monotonic(), 0
    consecutive_bad, last_eval_step, last_ckpt_step = 0, -1, step
    val_bpd = math.nan

    def evaluate() -> float:
        mean, count = evaluate_bits_per_dim(
            ema.model, _validation_batches(config), seed=config.eval_seed
        )
        history["validation"].append([step, mean])
        logger.metrics({"val_bits_per_dim": mean, "val_images": count}, step)
        logger.artifact_bytes(
            _sample_grid(ema.model, config.sample_temperature, step), f"samples/step-{step:07d}.png"
        )
        _say(f"step {step}: validation {mean:.4f} bits/dim on {count} images")
        return mean

    def checkpoint_and_report(metrics: dict[str, float]) -> None:
        nonlocal last_ckpt_step
        last_ckpt_step = step
        if not is_chief:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            train_state = TrainState(
                step,
                images_seen,
                skipped_total,
                optimizer.state_dict(),
                torch.get_rng_state(),
                history,
            )
            save_checkpoint(Path(tmp), unwrap(model), ema.model, train_state, loop_config["train"])
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    done = step >= config.max_steps
    while not done:
        epoch_steps = 0
        for batch in shard.iter_torch_batches(
            batch_size=config.batch_size,
            drop_last=True,
            local_shuffle_buffer_size=config.data.shuffle_buffer or None,
            device=str(device),
        ):
            _maybe_inject_fault(config, step, rank, world)
            lr = _set_lr(optimizer, config, step)
            metrics = train_step(
                model,
                batch["image"],
                optimizer,
                max_grad_norm=config.optim.max_grad_norm,
                generator=generator if device.type == "cpu" else None,
                all_finite=lambda ok: _all_agree(ok, dist.ReduceOp.MIN),
            )
            step += 1
            epoch_steps += 1
            window_steps += 1
            if metrics.skipped:
                skipped_total += 1
                consecutive_bad += 1
                if consecutive_bad >= config.max_nonfinite_steps:
                    raise FloatingPointError(
                        f"{consecutive_bad} consecutive non-finite training steps (last at step {step}); "
                        f"stopping. The last good checkpoint (step {last_ckpt_step}) is intact: lower "
                        "optim.lr or optim.max_grad_norm and rerun to resume from it."
                    )
            else:
                consecutive_bad = 0
                ema.update(unwrap(model))
                images_seen += config.batch_size * world
            history["train"].append([step, metrics.bits_per_dim])

            elapsed = time.monotonic() - started
            out_of_time = config.max_minutes is not None and elapsed > 60 * config.max_minutes
            done = step >= config.max_steps or _all_agree(out_of_time, dist.ReduceOp.MAX)

            if step % config.log_every == 0 or done:
                window = time.monotonic() - window_start
                rate = window_steps * config.batch_size * world / max(window, 1e-9)
                sec_per_step = window / max(window_steps, 1)
                eta = (config.max_steps - step) * sec_per_step
                if config.max_minutes is not None:
                    eta = min(eta, 60 * config.max_minutes - elapsed)
                logger.metrics(
                    {
                        "train_bits_per_dim": metrics.bits_per_dim,
                        "images_per_second": rate,
                        "learning_rate": lr,
                        "grad_norm": metrics.grad_norm,
                        "skipped_steps": skipped_total,
                    },
                    step,
                )
                if is_chief:
                    _say(
                        f"step {step}/{config.max_steps} | {metrics.bits_per_dim:.3f} bits/dim | "
                        f"{rate:.0f} img/s | lr {lr:.2e} | skipped {skipped_total} | ETA {_format_eta(max(eta, 0))}"
                    )
                window_start, window_steps = time.monotonic(), 0
            if is_chief and (step % config.eval_every == 0 or done):
                val_bpd = evaluate()
                last_eval_step = step
            if step % config.checkpoint_every == 0 or done:
                checkpoint_and_report(
                    {
                        "step": step,
                        "val_bits_per_dim": val_bpd if last_eval_step == step else math.nan,
                        "skipped_steps": skipped_total,
                    }
                )
            if done:
                break
        if epoch_steps == 0:
            raise ValueError(
                f"the training split {config.data.train} gives no full batch of {config.batch_size} "
                f"images per worker ({world} workers): use more images or a smaller batch_size"
            )
    if last_ckpt_step != step:  # resumed at or past max_steps: still report the final state
        if is_chief and last_eval_step != step:
            val_bpd = evaluate()
        checkpoint_and_report(
            {"step": step, "val_bits_per_dim": val_bpd, "skipped_steps": skipped_total}
        )
