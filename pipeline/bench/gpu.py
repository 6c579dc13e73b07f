"""The GPU check: `python -m pipeline.bench.gpu --output gpu.md` (or `flowray bench gpu`).

For a bare GPU box with PyTorch (CUDA), numpy, pandas, pyyaml, safetensors, pyarrow and Pillow:
no Ray, MLflow, webdataset, s3fs, fsspec or psutil. In a world-size-1 process group (NCCL on
CUDA), within `budget_s`, it trains the preset's model through the Ray worker's core (run_step)
once per `OPTIONS` entry, from the same start on the same batches (images/s, held-out bits/dim of
the EMA weights, host syncs per step); profiles a training step and a scoring batch; scores
through predict_frame against the raw forward; samples; and round-trips a checkpoint GPU -> CPU
-> GPU. Compiled options come last, so a compile that overruns loses nothing else. The tables
are rewritten to --output (and .json) after every phase. Without a GPU it says so and exits 0;
`--device cpu --small` runs it all at toy sizes on the CPU. The images are synthetic (smooth
random colour fields): the figures compare settings, they are not a dataset's bits/dim.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from flowmodel import Flow, dequantize
from pipeline.bench.harness import Result, Run, Table, preset_flow, suite_settings, timed
from pipeline.config import load_config
from pipeline.model.likelihood import keyed_noise, predict_frame
from pipeline.train.checkpoint import load_checkpoint, save_checkpoint
from pipeline.train.config import TrainConfig
from pipeline.train.core import Training, run_step, start_training
from pipeline.train.loop_state import LoopState, record_outcome, settle
from pipeline.train.step import evaluate_bits_per_dim, flow_bits_per_dim


@dataclass(frozen=True)
class Settings:
    """Each option trains `train_seconds` after `warmup_steps` untimed steps (compiling, graph
    capture) and `sync_every` steps whose host syncs are counted; one that would overrun
    `budget_s` (plus `compile_allowance_s` when compiled) is not run. `train_only`: only the
    fp32 vs bf16 race over `steps` interleaved steps, timed from `timed_from`."""

    device: str = "auto"  # auto (CUDA if any), cuda[:N] or cpu
    preset: str = "rgb32"  # a preset name or YAML: the model, the optimizer and its lr
    budget_s: float = 480.0
    train_seconds: float = 15.0
    warmup_steps: int = 3
    sync_every: int = 10  # the worker's read interval (TrainConfig.sync_every)
    lr_warmup_steps: int = 50
    lr_scaling: Literal["sqrt", "linear"] = "sqrt"  # the batch options' lr * sqrt(k) or * k
    options: tuple[str, ...] = ()  # names from OPTIONS (empty: all; eager always runs)
    compile: bool = True  # run the compiled options
    compile_allowance_s: float = 75.0
    batch_size: int = 256  # the baseline's
    train_images: int = 20_000
    eval_images: int = 2_000  # held out
    score_images: int = 100_000
    score_batch: int = 8_192
    sweep: tuple[int, ...] = (1_024, 4_096, 16_384)  # batch sizes of the raw forward sweep
    sample_images: int = 10_000
    profile_rows: int = 10  # top lines per profile section
    small: bool = False  # a shrunken model (the smoke run)
    train_only: bool = False
    steps: int = 400
    timed_from: int = 50

    @property
    def torch_device(self) -> torch.device:
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:  # DDP's device_ids want an index
            device = torch.device("cuda", torch.cuda.current_device())
        return device


SMOKE = {
    "train_seconds": 0.0,  # one read interval per option
    "warmup_steps": 1,
    "sync_every": 2,
    "lr_warmup_steps": 2,
    "batch_size": 8,
    "train_images": 64,
    "eval_images": 32,
    "score_images": 64,
    "score_batch": 32,
    "sweep": [16, 32],
    "sample_images": 8,
    "profile_rows": 3,
    "compile": False,
    "small": True,
    "steps": 2,
    "timed_from": 1,
}

NO_GPU = "no CUDA device on this machine: the GPU bench did not run (--device cpu --small runs its CPU smoke)"
NA = "n/a (cuda only)"


@dataclass(frozen=True)
class Option:
    """One training setting against eager (the preset in fp32 at the baseline batch, torch's
    defaults: cuDNN in TF32, matmuls in fp32). `compile`: a torch.compile mode ("default" is the
    worker's `compile: true`; "reduce-overhead" adds CUDA graphs). `batch_factor` k multiplies
    the batch and scales the lr; `tf32` sets matmul and cuDNN TF32 (None: as is)."""

    name: str
    cuda_only: bool = False
    precision: str = "fp32"
    batch_factor: int = 1
    channels_last: bool = False
    fused_adam: bool = False
    tf32: bool | None = None
    compile: str | None = None
    ddp: bool = False


OPTIONS = (
    Option("eager"),
    Option("bf16", precision="bf16"),
    Option("channels_last", channels_last=True),
    Option("fused_adam", cuda_only=True, fused_adam=True),
    Option("tf32", cuda_only=True, tf32=True),
    Option("no_tf32", cuda_only=True, tf32=False),
    Option("ddp", ddp=True),  # DDP in a world of 1: the wrapper's own cost
    Option("batch_x4", batch_factor=4),
    Option("batch_x16", batch_factor=16),
    # Compiled, last (a minute each). First the candidate GPU preset: CUDA graphs, TF32, fused
    # Adam and channels_last at batch x4.
    Option(
        "all",
        True,
        batch_factor=4,
        channels_last=True,
        fused_adam=True,
        tf32=True,
        compile="reduce-overhead",
    ),
    Option("cuda_graphs", cuda_only=True, compile="reduce-overhead"),
    Option("compiled", cuda_only=True, compile="default"),
)


@dataclass
class Report:
    """The main table's rows (printed as they come), the profile table, the JSON's figures."""

    rows: list[list[str]] = field(default_factory=list)
    profile: Table = field(
        default_factory=lambda: Table(["profile", "kernel or op", "self ms", "calls"])
    )
    figures: dict[str, float] = field(default_factory=dict)

    def add(self, what: str, rate: Any, bits: Any, note: str = "", syncs: Any = "-") -> None:
        """Floats formatted (None or NaN: "-"), strings as they are."""
        cells = [(rate, ",.0f"), (bits, ".4f"), (syncs, ".2f")]
        text = [
            v if isinstance(v, str) else format(v, f) if v is not None and math.isfinite(v) else "-"
            for v, f in cells
        ]
        row = [what, *text, note]
        self.rows.append(row)
        print("  " + " | ".join(row), flush=True)


def smooth_images(count: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """uint8 [count, C, H, W]: random colours on a grid of 4x4 blocks, plus a little noise."""
    rng = np.random.default_rng(seed)
    channels, height, width = shape
    blocks = rng.integers(0, 256, (count, channels, height // 4, width // 4), dtype=np.int16)
    images = blocks.repeat(4, axis=2).repeat(4, axis=3)  # (count, C, H, W)
    images += rng.integers(-6, 7, images.shape, dtype=np.int16)
    return np.clip(images, 0, 255).astype(np.uint8)


def batches(images: np.ndarray, size: int, prefix: str) -> Iterator[tuple[list[str], torch.Tensor]]:
    for start in range(0, len(images), size):
        chunk = images[start : start + size]
        yield [f"{prefix}-{start + i}" for i in range(len(chunk))], torch.from_numpy(chunk)


def host_syncs(work: Callable[[], Any], device: torch.device) -> float:
    """Synchronizing CUDA calls during `work()`, counted by torch's sync debug mode (a warning
    each); NaN off CUDA (`work` still runs)."""
    if device.type != "cuda":
        work()
        return math.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            work()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return float(sum("synchroniz" in str(warning.message) for warning in caught))


@contextmanager
def tf32(on: bool | None) -> Iterator[None]:
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if on is not None:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ----------------------------------------------------------------------------- training


def base_config(settings: Settings, warmup_steps: int | None = None) -> TrainConfig:
    """The preset at the baseline batch, read interval and warm-up; a smaller model if small."""
    overrides = [
        f"optim.warmup_steps={warmup_steps or settings.lr_warmup_steps}",
        f"batch_size={settings.batch_size}",
        f"sync_every={settings.sync_every}",
    ]
    if settings.small:
        overrides += ["model.steps_per_level=1", "model.hidden_channels=8"]
    return load_config(TrainConfig, settings.preset, overrides)


def option_config(option: Option, settings: Settings) -> TrainConfig:
    base, k = base_config(settings), option.batch_factor
    scale = math.sqrt(k) if settings.lr_scaling == "sqrt" else float(k)
    optim = replace(base.optim, lr=base.optim.lr * scale)
    compile = option.compile == "default"  # reduce-overhead is set on the built step
    batch = base.batch_size * k
    return replace(base, precision=option.precision, compile=compile, batch_size=batch, optim=optim)


def fresh_flow(config: TrainConfig, images: np.ndarray) -> Flow:
    """The same initialised flow every time."""
    return preset_flow(config.model, torch.from_numpy(images[:512]), config.seed)


def start(
    option: Option, config: TrainConfig, images: np.ndarray, device: torch.device
) -> Training:
    """The worker's Training for `option`: its memory format, optimizer, wrapper and step."""
    flow = fresh_flow(config, images).to(device)
    if option.channels_last:
        flow = flow.to(memory_format=torch.channels_last)
    wrap = None
    if option.ddp:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device] if device.type == "cuda" else None
        wrap = lambda placed: DistributedDataParallel(placed, device_ids=ids)  # noqa: E731
    if option.compile:
        from torch import _dynamo

        _dynamo.reset()  # each option compiles its own step
    training = start_training(flow, config, device, wrap=wrap)
    if option.fused_adam:
        training.optimizer = torch.optim.Adam(
            training.model.parameters(),
            lr=config.optim.lr,
            weight_decay=config.optim.weight_decay,
            fused=True,
        )
    if option.compile == "reduce-overhead":
        training.loss.compiled = torch.compile(flow_bits_per_dim, mode="reduce-overhead")
        training.loss.note = "training step: torch.compile, mode reduce-overhead (CUDA graphs)"
    return training


def train_option(
    option: Option, data: dict[str, np.ndarray], settings: Settings
) -> tuple[Training, dict[str, float]]:
    """`option` trained as the worker does (Settings); the clock is read at reads, every
    `sync_every` steps, when the device has caught up."""
    config, device = option_config(option, settings), settings.torch_device
    training = start(option, config, data["train"], device)
    pool = torch.from_numpy(data["train"]).to(device)  # on the device: no copy per step
    order = torch.Generator(device=device).manual_seed(1)  # the same batches for every option
    state = LoopState()

    def step() -> None:
        index = torch.randint(0, len(pool), (config.batch_size,), generator=order, device=device)
        images = pool[index]
        if option.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        record_outcome(state, run_step(training, config, images, state.step))
        if state.step % config.sync_every == 0:
            settle(state, global_batch=config.batch_size, max_skipped=config.max_nonfinite_steps)

    first, _ = timed(lambda: [step() for _ in range(settings.warmup_steps)], device)
    syncs = host_syncs(lambda: [step() for _ in range(config.sync_every)], device)
    settle(state, global_batch=config.batch_size, max_skipped=config.max_nonfinite_steps)
    started, from_step = time.perf_counter(), state.step
    while True:
        step()
        elapsed = time.perf_counter() - started
        if state.step % config.sync_every == 0 and elapsed >= settings.train_seconds:
            break
    bits, _ = evaluate_bits_per_dim(training.ema.model, batches(data["eval"], 500, "eval"))
    return training, {
        "images_per_second": (state.step - from_step) * config.batch_size / elapsed,
        "eval_bits_per_dim": bits,
        "syncs_per_step": syncs / config.sync_every,
        "steps": state.step,
        "seconds": elapsed,
        "untimed_seconds": first,
        "lr": config.optim.lr,
        "batch_size": config.batch_size,
    }


def option_phase(
    options: list[Option],
    data: dict[str, np.ndarray],
    settings: Settings,
    report: Report,
    left: Callable[[], float],
) -> Iterator[str]:
    """A row per option, yielding after each; returns eager's Training (None if it did not run)."""
    kept = None
    for option in options:
        name, compiled = f"train {option.name}", option.compile is not None
        need = settings.train_seconds + compiled * settings.compile_allowance_s
        if option.cuda_only and settings.torch_device.type != "cuda":
            report.add(name, "n/a", "n/a", NA, "n/a")
        elif compiled and not settings.compile:
            report.add(name, None, None, "not run (compile: false)")
        elif left() < need:
            report.add(
                name, None, None, f"not run (budget: {left():.0f} s left, {need:.0f} needed)"
            )
        else:
            with tf32(option.tf32):
                done = guarded(report, name, train_option, option, data, settings)
            if done is not None:
                option_row(name, option, *done, report)
                kept = done[0] if option.name == "eager" else kept
        yield name
    return kept


def option_row(
    name: str, option: Option, training: Training, figures: dict[str, float], report: Report
) -> None:
    report.figures.update({f"{name}: {key}": value for key, value in figures.items()})
    rate, bits = figures["images_per_second"], figures["eval_bits_per_dim"]
    base_rate = report.figures.get("train eager: images_per_second", math.nan)
    base_bits = report.figures.get("train eager: eval_bits_per_dim", math.nan)
    note = (
        f"x{rate / base_rate:.2f} of eager, {bits - base_bits:+.4f} bits/dim; "
        f"{figures['steps']} steps of batch {figures['batch_size']}, lr {figures['lr']:.2g}, "
        f"timed {figures['seconds']:.0f} s (untimed first steps {figures['untimed_seconds']:.1f} s)"
    )
    if option.compile:
        note += f"; {training.loss.note}"
    syncs = figures["syncs_per_step"]
    report.add(name, rate, bits, note, syncs if math.isfinite(syncs) else "n/a")


def precision_race(data: dict[str, np.ndarray], settings: Settings, report: Report) -> None:
    """fp32 and bf16 from the same start on the same batches, steps interleaved so that both see
    the same load: median step time after `timed_from` steps, held-out EMA bits/dim."""
    base, device = base_config(settings, max(1, settings.steps // 8)), settings.torch_device
    configs = {"fp32": base, "bf16": replace(base, precision="bf16")}
    trainings = {
        name: start_training(fresh_flow(config, data["train"]), config, device)
        for name, config in configs.items()
    }
    pool, order = torch.from_numpy(data["train"]).to(device), torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for step in range(settings.steps):
        batch = pool[torch.randint(0, len(pool), (base.batch_size,), generator=order).to(device)]
        for name, training in trainings.items():
            seconds, _ = timed(partial(run_step, training, configs[name], batch, step), device)
            times[name].append(seconds)
    rates, bits = {}, {}
    for name, training in trainings.items():
        rates[name] = base.batch_size / float(np.median(times[name][settings.timed_from :]))
        bits[name], _ = evaluate_bits_per_dim(training.ema.model, batches(data["eval"], 500, "e"))
    for name in configs:
        note = f"{settings.steps} interleaved steps of batch {base.batch_size}, median step time"
        if name == "bf16":
            note = f"x{rates['bf16'] / rates['fp32']:.2f} of fp32; {bits['bf16'] - bits['fp32']:+.5f} bits/dim"
        report.add(f"race {name}", rates[name], bits[name], note)
        report.figures.update(
            {f"race {name} images/s": rates[name], f"race {name} bits": bits[name]}
        )


# ----------------------------------------------------------------------------- profiles


def profile(
    what: str, work: Callable[[], Any], device: torch.device, count: int, report: Report
) -> None:
    """torch.profiler over one `work()` after a warm-up: the top `count` kernels by device time,
    the top host ops by CPU time, and the wall time, the device's idle share (host gaps) and the
    kernel launches."""
    cuda, rows = device.type == "cuda", report.profile.rows
    work()
    activities = [torch.profiler.ProfilerActivity.CPU]
    activities += [torch.profiler.ProfilerActivity.CUDA] if cuda else []
    with torch.profiler.profile(activities=activities) as profiled:
        wall, _ = timed(work, device)
    events = profiled.key_averages()
    kernels = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:count]
    rows += [[f"{what}: device", e.key[:90], e.self_device_time_total / 1e3, e.count] for e in top]
    if not cuda:
        rows.append([f"{what}: device", NA, "-", "-"])
    host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:count]
    rows += [[f"{what}: host", e.key[:90], e.self_cpu_time_total / 1e3, e.count] for e in host]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6 if cuda else math.nan
    launches = sum(e.count for e in events if "LaunchKernel" in e.key)
    gaps = f"device busy {busy * 1e3:.1f} ms ({1 - busy / wall:.0%} idle: host gaps)"
    note = (
        f"{what}: {wall * 1e3:.1f} ms wall under the profiler; "
        f"{gaps if cuda else 'device busy: ' + NA}; {launches} kernel launches"
    )
    report.profile.notes.append(note)
    report.figures.update({f"profile {what}: wall_s": wall, f"profile {what}: busy_s": busy})
    print("  " + note, flush=True)


# ----------------------------------------------------------------------------- scoring, sampling


def raw_forward_rate(flow: Flow, images: np.ndarray, batch: int, device: torch.device) -> float:
    """Images/s of the forward pass alone, on dequantized images already on the device."""
    y = dequantize(torch.from_numpy(images[:batch]), flow.config.n_bits).to(device)
    rounds = max(1, min(len(images), 4 * batch) // batch)
    with torch.no_grad():
        flow.log_prob(y, check=False)  # warm-up: allocations, cuDNN algorithm choice
        seconds, _ = timed(lambda: [flow.log_prob(y, check=False) for _ in range(rounds)], device)
    return rounds * len(y) / seconds


def score_rate(
    flow: Flow, images: np.ndarray, batch: int, device: torch.device
) -> tuple[float, np.ndarray]:
    """Images/s of predict_frame over `images` in batches of `batch`, and its bits/dim."""
    keys = [f"img-{i}" for i in range(len(images))]
    predict_frame(flow, images[:batch], keys[:batch], 0, 1)  # warm-up
    frames: list[Any] = []

    def work() -> None:
        for start in range(0, len(images), batch):
            stop = start + batch
            frames.append(predict_frame(flow, images[start:stop], keys[start:stop], 0, 1))

    seconds, _ = timed(work, device)
    bits = np.concatenate([frame["bits_per_dim"].to_numpy() for frame in frames])
    return len(images) / seconds, bits


def score_phase(flow: Flow, settings: Settings, report: Report) -> None:
    """predict_frame in fp32 and bf16 against the raw forward at the same batch, a sweep of the
    raw forward, keyed noise on the CPU and the device, and a profile of one batch."""
    device, batch = settings.torch_device, settings.score_batch
    images = smooth_images(settings.score_images, flow.config.image_shape, seed=2)
    flow = flow.to(device).eval()
    raw = raw_forward_rate(flow, images, batch, device)
    rate, bits = score_rate(flow, images, batch, device)
    note = (
        f"{len(images):,} images, batch {batch}; raw forward {raw:,.0f}/s, ratio {rate / raw:.2f}"
    )
    report.add("score fp32 (predict_frame)", rate, float(bits.mean()), note)
    flow.set_precision("bf16")
    rate_bf16, bits_bf16 = score_rate(flow, images, batch, device)
    raw_bf16 = raw_forward_rate(flow, images, batch, device)
    flow.set_precision("fp32")
    drift = float(np.abs(bits_bf16 - bits).max())
    note = f"raw forward {raw_bf16:,.0f}/s, ratio {rate_bf16 / raw_bf16:.2f}; max per-image difference to fp32 {drift:.2e} bits/dim"
    report.add("score bf16 (predict_frame)", rate_bf16, float(bits_bf16.mean()), note)
    sweep = {size: raw_forward_rate(flow, images, size, device) for size in settings.sweep}
    text = ", ".join(f"{size:,}: {value:,.0f}/s" for size, value in sweep.items())
    report.add("raw forward fp32 by batch size", max(sweep.values()), None, text)
    keys, shape = [f"img-{i}" for i in range(min(len(images), 20_000))], flow.config.image_shape
    seconds, on_cpu = timed(lambda: keyed_noise(keys, shape, 0), device)
    report.add("keyed noise on the CPU", len(keys) / seconds, None)
    seconds, on_device = timed(lambda: keyed_noise(keys, shape, 0, device), device)
    assert torch.equal(on_device.cpu(), on_cpu), (
        "keyed noise: expected the CPU's numbers, bit for bit"
    )
    equal = "equal to the CPU's, bit for bit"
    report.add(f"keyed noise on {device.type}", len(keys) / seconds, None, equal)
    report.figures.update({"score_fp32": rate, "raw_forward_fp32": raw, "score_bf16": rate_bf16})
    first = images[:batch]
    one = partial(predict_frame, flow, first, [f"one-{i}" for i in range(len(first))], 0, 1)
    profile(f"scoring batch of {batch}", one, device, settings.profile_rows, report)


def sample_phase(flow: Flow, settings: Settings, report: Report) -> None:
    """Images/s of Flow.sample in chunks of up to 2,000 (z from a seeded CPU generator)."""
    count, chunk = settings.sample_images, min(settings.sample_images, 2_000)
    flow.sample(min(chunk, 8), 0.7, torch.Generator().manual_seed(0))  # warm-up

    def draw() -> list[torch.Tensor]:
        seeded = [
            (min(chunk, count - i), torch.Generator().manual_seed(i))
            for i in range(0, count, chunk)
        ]
        return [flow.sample(size, 0.7, generator) for size, generator in seeded]

    seconds, drawn = timed(draw, settings.torch_device)
    shapes = {tuple(images.shape[1:]) for images in drawn}
    assert shapes == {flow.config.image_shape} and all(x.dtype == torch.uint8 for x in drawn)
    report.add("sample (Flow.sample, temperature 0.7)", count / seconds, None, f"chunks of {chunk}")
    report.figures["sample"] = count / seconds


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_gaps(device_flow: Flow, loaded: Flow, images: np.ndarray) -> tuple[float, float]:
    """Largest per-image log p gaps, in bits/dim, of the reloaded flow against (1) the device
    flow copied to the CPU (0 when the checkpoint holds exactly the weights) and (2) the device
    flow on its device (the arithmetic gap)."""
    y = dequantize(torch.from_numpy(images), loaded.config.n_bits, torch.Generator().manual_seed(0))
    device = next(device_flow.parameters()).device
    with torch.no_grad():
        reference = loaded.log_prob(y)
        copied = copy.deepcopy(device_flow).cpu().log_prob(y)
        on_device = device_flow.log_prob(y.to(device)).cpu()
    scale = loaded.config.dims * math.log(2)
    return (
        float((copied - reference).abs().max()) / scale,
        float((on_device - reference).abs().max()) / scale,
    )


def resume_one_step(
    directory: Path, config: TrainConfig, device: torch.device, images: np.ndarray
) -> Training:
    """Load a checkpoint (on the CPU, as the worker does) and take one step on `device`."""
    flow, ema, saved = load_checkpoint(directory)
    training = start_training(flow, config, device, restored=(ema, saved))
    metrics = run_step(training, config, torch.from_numpy(images), saved.step).read()
    assert math.isfinite(metrics.bits_per_dim) and not metrics.skipped, metrics
    return training


def save(directory: Path, training: Training, config: TrainConfig, step: int) -> None:
    optimizer = training.optimizer.state_dict()  # moments on the training device
    state = LoopState(step=step).saved(optimizer, torch.get_rng_state(), training.ema.updates)
    save_checkpoint(directory, training.flow, training.ema.model, state, config.to_dict())


def checkpoint_phase(
    training: Training, data: dict[str, np.ndarray], settings: Settings, report: Report
) -> None:
    """Device checkpoint -> CPU (the same log p, one step), that CPU state -> device (one step)."""
    config, cpu, kind = base_config(settings), torch.device("cpu"), settings.torch_device.type
    batch, step = data["train"][:4], training.ema.updates
    with tempfile.TemporaryDirectory() as tmp:
        on_device, on_cpu = Path(tmp) / "device", Path(tmp) / "cpu"
        save(on_device, training, config, step)
        _, ema, _ = load_checkpoint(on_device)
        exact, arithmetic = checkpoint_gaps(training.ema.model, ema, data["eval"][:64])
        assert exact == 0.0, f"reloaded log p: expected identical, found a gap of {exact:.2e}"
        resumed = resume_one_step(on_device, config, cpu, batch)
        save(on_cpu, resumed, config, step + 1)
        resume_one_step(on_cpu, config, settings.torch_device, batch)
    note = (
        f"{kind} -> cpu: same log p on the cpu (gap {exact:.0e}); {kind} vs cpu arithmetic "
        f"{arithmetic:.1e} bits/dim; resumed a step on cpu, then on {kind}"
    )
    report.add("checkpoint round trip", None, None, note)
    report.figures["checkpoint_arithmetic_gap_bits_per_dim"] = arithmetic


# ----------------------------------------------------------------------------- the run


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory / 2**30
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        try:
            driver = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            driver = ""
        where = (
            f"{torch.cuda.get_device_name(device)} ({memory:.0f} GiB), driver "
            f"{(driver.split() or ['unknown'])[0]}, CUDA {torch.version.cuda}"
        )
    else:
        where = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    return f"{where}; torch {torch.__version__}; Python {platform.python_version()}"


def tables(report: Report, settings: Settings, seconds: float) -> list[Table]:
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    toy = " (small: a shrunken model, toy sizes)" if settings.small else ""
    title = f"GPU bench on {machine(settings.torch_device)}; {when}; {seconds:.0f} s{toy}"
    headers = ["what", "images/s", "bits/dim", "host syncs/step", "notes"]
    return [Table(headers, report.rows, title=title), report.profile]


def guarded(report: Report, what: str, work: Callable[..., Any], *args: Any) -> Any:
    """`work(*args)`; on an error, a "failed" row and None: one failure must not cost a one-shot
    GPU run its other figures."""
    try:
        return work(*args)
    except Exception as err:
        traceback.print_exc()
        failure = f"failed: {type(err).__name__}: {str(err).strip()[:200]}"
        report.add(what, None, None, failure)
        return None


def chosen(settings: Settings) -> list[Option]:
    known = [option.name for option in OPTIONS]
    if unknown := set(settings.options) - set(known):
        raise ValueError(f"options: expected names from {known}, found {sorted(unknown)}")
    wanted = set(settings.options or known) | {"eager"}
    return [option for option in OPTIONS if option.name in wanted]


def phases(settings: Settings, report: Report) -> Iterator[str]:
    """The phases, yielding after each (so that the tables can be written)."""
    config, device, started = base_config(settings), settings.torch_device, time.perf_counter()
    shape = config.model.image_shape
    data = {
        "train": smooth_images(settings.train_images, shape, seed=0),
        "eval": smooth_images(settings.eval_images, shape, seed=1),
    }
    print(f"GPU bench: {machine(device)}; {config.model}", flush=True)
    if settings.train_only:  # the CPU precision comparison
        precision_race(data, settings, report)
        yield "race"
        return
    left = lambda: settings.budget_s - (time.perf_counter() - started)  # noqa: E731
    options = chosen(settings)
    training = yield from option_phase(
        [o for o in options if not o.compile], data, settings, report, left
    )
    if training is not None:
        batch = torch.from_numpy(data["train"][: config.batch_size]).to(device)
        step = lambda: run_step(training, config, batch, 0).read()  # noqa: E731 (one read, as the worker's)
        what, rows = f"training step of {config.batch_size}", settings.profile_rows
        guarded(report, "profile", profile, what, step, device, rows, report)
        guarded(report, "score", score_phase, copy.deepcopy(training.ema.model), settings, report)
        yield "score"
        guarded(report, "sample", sample_phase, training.ema.model, settings, report)
        guarded(report, "checkpoint", checkpoint_phase, training, data, settings, report)
        yield "sample and checkpoint"
    yield from option_phase([o for o in options if o.compile], data, settings, report, left)


def run(settings: Settings, out: Path | None = None) -> Result:
    """Every phase on `settings.device` in a world-size-1 process group (NCCL on CUDA, gloo on
    the CPU); the tables are rewritten to `out` (Markdown) and its .json after each phase."""
    started, device, report = time.perf_counter(), settings.torch_device, Report()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # NCCL for CUDA tensors; gloo for CPU ones (the checkpoint phase resumes a step on the CPU).
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        for _ in phases(settings, report):
            seconds = time.perf_counter() - started
            result = Result({"figures": report.figures}, tables(report, settings, seconds))
            if out is not None:
                out.write_text(result.markdown() + "\n")
                out.with_suffix(".json").write_text(json.dumps(result.report(), default=str))
    finally:
        dist.destroy_process_group()
    return result


def resolved(settings: Settings) -> Settings | None:
    """`settings` on a concrete device; None when they ask for a GPU this machine lacks."""
    wanted = settings.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else ""
    if not wanted or (wanted.startswith("cuda") and not torch.cuda.is_available()):
        return None
    return replace(settings, device=wanted)


def measure(settings: Settings, run_in: Run) -> Result:
    on_device = resolved(settings)
    if on_device is None:
        return Result({"skipped": NO_GPU}, [Table([], notes=[NO_GPU])])
    return run(on_device)


def main(argv: list[str] | None = None) -> int:
    """Exit 0, or 1 when a phase or an option failed (its row says how)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench.gpu", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if any), cuda[:N] or cpu")
    parser.add_argument("--small", action="store_true", help="toy sizes, a shrunken model")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Settings field, e.g. --set train_seconds=300 --set options=[eager,all]",
    )
    parser.add_argument("--output", "--out", help="also write the tables here (and .json)")
    args = parser.parse_args(argv)
    changes = {**(SMOKE if args.small else {}), "device": args.device}
    settings = resolved(suite_settings(Settings, changes, args.overrides))
    if settings is None:
        print(NO_GPU, flush=True)
        return 0
    result = run(settings, Path(args.output) if args.output else None)
    print("\n" + result.markdown(), flush=True)
    return 1 if any(row[-1].startswith("failed:") for row in result.tables[0].rows) else 0


if __name__ == "__main__":
    sys.exit(main())
