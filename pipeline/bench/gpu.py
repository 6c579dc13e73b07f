"""The GPU check: `python -m pipeline.bench.gpu [--out gpu.md]` (or `flowray bench gpu`).

For a bare GPU box with PyTorch (CUDA), numpy, pandas, pyyaml, safetensors, pyarrow and Pillow
only: it imports no Ray, MLflow, webdataset, s3fs, fsspec or psutil. On one GPU, with a
world-size-1 NCCL process group so that the training collectives reduce GPU tensors, it

    trains     the rgb32 preset's model (jobs/configs/rgb32.yaml) for --steps steps through the
               Ray worker's own core (pipeline.train.core: placement, train step, EMA, the
               all-reduces), in fp32, bf16, fp32 wrapped in DDP, and bf16 compiled: images/s and
               held-out bits/dim of the EMA weights after the steps (keyed noise, as validation);
    scores     100,000 synthetic images through predict_frame (the scoring actors' code):
               images/s, and its ratio to the flow's raw forward pass at the same batch size;
    samples    images/s of Flow.sample;
    checks     a checkpoint written on the GPU loads on the CPU with exactly the same log p (both
               computed on the CPU; the GPU-vs-CPU arithmetic gap is reported) and resumes
               there, and a CPU checkpoint resumes on the GPU;

then prints one Markdown table (and writes it to --out after every phase; the compiled run comes
last, so a compile that overruns loses nothing else). Without a GPU it says so and exits 0.
`--device cpu --small` (`flowray bench gpu --smoke --set device=cpu`) runs every phase at toy
sizes on the CPU (the test suite does this).
The images are synthetic (smooth random colour fields): the figures compare settings with one
another; they are not a dataset's bits/dim.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from flowmodel import Flow, dequantize
from pipeline.bench.harness import Result, Run, Table, preset_flow, timed
from pipeline.config import load_config
from pipeline.model.likelihood import keyed_noise, predict_frame
from pipeline.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from pipeline.train.config import TrainConfig
from pipeline.train.core import Training, run_step, start_training
from pipeline.train.distributed import check_identical_start
from pipeline.train.step import evaluate_bits_per_dim

__all__ = ["SMOKE", "Settings", "main", "measure", "run"]


@dataclass(frozen=True)
class Settings:
    """Attributes:
    device: auto (CUDA if any), cuda[:N] or cpu.
    steps: training steps per run.
    timed_from: steps before this one are not timed (allocation, autotuning).
    batch_size: training batch size.
    train_images: synthetic training images.
    eval_images: held-out synthetic images.
    score_images: images scored.
    score_batch: images per scoring batch.
    sweep: batch sizes of the raw forward sweep.
    sample_images: images sampled.
    compile: also train bf16 compiled (last).
    small: a shrunken model (the smoke run).
    compile_after_seconds: the compiled run is skipped when it would start later than this.
    preset: a preset name or YAML path: the model and optimizer.
    train_only: only fp32 against bf16, steps interleaved (the CPU precision comparison).
    """

    device: str = "auto"
    steps: int = 400
    timed_from: int = 50
    batch_size: int = 256
    train_images: int = 20_000
    eval_images: int = 2_000
    score_images: int = 100_000
    score_batch: int = 8_192
    sweep: tuple[int, ...] = (1_024, 4_096, 16_384)
    sample_images: int = 10_000
    compile: bool = True
    small: bool = False
    compile_after_seconds: float = 200.0
    preset: str = "rgb32"
    train_only: bool = False

    @property
    def torch_device(self) -> torch.device:
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:  # DDP's device_ids want an index
            device = torch.device("cuda", torch.cuda.current_device())
        return device


SMOKE = {
    "steps": 2,
    "timed_from": 1,
    "batch_size": 8,
    "train_images": 64,
    "eval_images": 32,
    "score_images": 64,
    "score_batch": 32,
    "sweep": [16, 32],
    "sample_images": 8,
    "compile": False,
    "small": True,
}

NO_GPU = "no CUDA device on this machine: the GPU bench did not run (--device cpu --small runs its CPU smoke)"


@dataclass
class Report:
    """Rows of the table (what, images/s, bits/dim, notes; printed as they come), and the figures
    behind them (for `flowray bench`'s JSON)."""

    rows: list[list[str]] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)

    def add(self, what: str, rate: float | None, bits: float | None, note: str = "") -> None:
        rate_text = f"{rate:,.0f}" if rate is not None and math.isfinite(rate) else "-"
        bits_text = f"{bits:.4f}" if bits is not None and math.isfinite(bits) else "-"
        self.rows.append([what, rate_text, bits_text, note])
        print(f"  {what}: {rate_text} images/s, {bits_text} bits/dim {note}".rstrip(), flush=True)


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


# ----------------------------------------------------------------------------- training


def base_config(settings: Settings) -> TrainConfig:
    """The preset (rgb32) with warmup shortened to the run's length; a smaller model if small."""
    overrides = [
        f"optim.warmup_steps={max(1, settings.steps // 8)}",
        f"batch_size={settings.batch_size}",
    ]
    if settings.small:
        overrides += ["model.steps_per_level=1", "model.hidden_channels=8"]
    return load_config(TrainConfig, settings.preset, overrides)


def fresh_flow(config: TrainConfig, images: np.ndarray) -> Flow:
    """The same initialised flow every time: seeded weights, ActNorm set on the first images."""
    return preset_flow(config.model, torch.from_numpy(images[:512]), config.seed)


def train_run(
    config: TrainConfig, data: dict[str, np.ndarray], settings: Settings, ddp: bool = False
) -> tuple[Training, dict[str, float]]:
    """`settings.steps` steps of the worker's core on `settings.device`; images/s over the
    timed steps, the first step's seconds (compiling, if any), and held-out EMA bits/dim."""
    device, steps = settings.torch_device, settings.steps
    flow = fresh_flow(config, data["train"]).to(device)
    check_identical_start(flow, device)  # an all_gather of a device tensor
    wrap = None
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device] if device.type == "cuda" else None
        wrap = lambda placed: DistributedDataParallel(placed, device_ids=ids)  # noqa: E731
    training = start_training(flow, config, device, wrap=wrap)
    pool = torch.from_numpy(data["train"]).to(device)  # on the device: no copy per step
    order = torch.Generator().manual_seed(1)
    first, elapsed, losses = math.nan, 0.0, []
    for step in range(steps):
        index = torch.randint(0, len(pool), (config.batch_size,), generator=order).to(device)
        seconds, metrics = timed(partial(run_step, training, config, pool[index], step), device)
        first = seconds if step == 0 else first
        elapsed += seconds if step >= settings.timed_from else 0.0
        losses.append(metrics.bits_per_dim)
    timed_steps = steps - settings.timed_from
    bits, _ = evaluate_bits_per_dim(training.ema.model, batches(data["eval"], 500, "eval"))
    return training, {
        "images_per_second": timed_steps * config.batch_size / elapsed if elapsed else math.nan,
        "first_step_seconds": first,
        "train_bits_per_dim": float(np.mean(losses[-20:])),
        "eval_bits_per_dim": bits,
    }


def train_phase(
    data: dict[str, np.ndarray], settings: Settings, report: Report, compiled: bool = False
) -> Training | None:
    """fp32, bf16, fp32 under DDP and fp32 at 4x the batch (or, `compiled`, bf16 compiled): a row
    each. Returns the first run's Training (the fp32 one, which the checkpoint phase saves)."""
    base, first = base_config(settings), None
    runs = [("train fp32", base, False), ("train bf16", replace(base, precision="bf16"), False)]
    backend = "nccl" if settings.torch_device.type == "cuda" else "gloo"
    runs.append((f"train fp32, DDP (world 1, {backend})", base, True))
    # A quarter of the steps at 4x the batch: what a GPU does when the batch fills it.
    big = replace(base, batch_size=4 * settings.batch_size)
    runs.append((f"train fp32, batch {big.batch_size}", big, False))
    if compiled:
        runs = [("train bf16, compiled", replace(base, precision="bf16", compile=True), False)]
    for name, config, ddp in runs:
        quarter = replace(settings, steps=max(2, settings.steps // 4), timed_from=1)
        run_settings = quarter if config.batch_size != settings.batch_size else settings
        training, figures = train_run(config, data, run_settings, ddp=ddp)
        rate, bits = figures["images_per_second"], figures["eval_bits_per_dim"]
        baseline = report.figures.setdefault("train fp32: images_per_second", rate)
        baseline_bits = report.figures.setdefault("train fp32: eval_bits_per_dim", bits)
        steps = f"{run_settings.steps} steps of batch {config.batch_size}"
        note = steps
        if name != "train fp32" and run_settings is settings:
            note = f"x{rate / baseline:.2f} of fp32; {bits - baseline_bits:+.5f} bits/dim"
        elif name != "train fp32":  # fewer steps: its bits/dim do not compare
            note = f"x{rate / baseline:.2f} of fp32 images/s; {steps}"
        if config.compile:
            note += f"; {training.loss.note}; first step {figures['first_step_seconds']:.0f} s"
        report.add(name, rate, bits, note)
        report.figures.update({f"{name}: {key}": value for key, value in figures.items()})
        first = first or training
    return first


def precision_race(data: dict[str, np.ndarray], settings: Settings, report: Report) -> None:
    """fp32 and bf16 from the same start on the same batches, their steps interleaved so that
    both see the same load (a shared machine drifts between sequential runs): the median step
    time of each (after `timed_from` steps), and held-out EMA bits/dim after `steps` steps."""
    base, device = base_config(settings), settings.torch_device
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


# ----------------------------------------------------------------------------- scoring, sampling


def raw_forward_rate(flow: Flow, images: np.ndarray, batch: int, device: torch.device) -> float:
    """Images/s of the flow's forward pass alone on already dequantized images on the device."""
    y = dequantize(torch.from_numpy(images[:batch]), flow.config.n_bits).to(device)
    rounds = max(1, min(len(images), 4 * batch) // batch)
    with torch.no_grad():
        flow.log_prob(y, check=False)  # warm-up: allocations, cuDNN algorithm choice
        seconds, _ = timed(lambda: [flow.log_prob(y, check=False) for _ in range(rounds)], device)
    return rounds * len(y) / seconds


def score_rate(
    flow: Flow, images: np.ndarray, batch: int, device: torch.device
) -> tuple[float, np.ndarray]:
    """Images/s of predict_frame (keyed noise on the CPU, y to the device, forward) over all
    `images` in batches of `batch`, and the bits/dim it gave."""
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
    """predict_frame on `score_images` images in fp32 and bf16, against the raw forward pass."""
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
    note = f"raw forward {raw_bf16:,.0f}/s; max per-image difference to fp32 {drift:.2e} bits/dim"
    report.add("score bf16 (predict_frame)", rate_bf16, float(bits_bf16.mean()), note)
    sweep = {size: raw_forward_rate(flow, images, size, device) for size in settings.sweep}
    text = ", ".join(f"{size:,}: {value:,.0f}/s" for size, value in sweep.items())
    report.add("raw forward fp32 by batch size", max(sweep.values()), None, text)
    keys = [f"img-{i}" for i in range(min(len(images), 20_000))]
    shape = flow.config.image_shape
    seconds, on_cpu = timed(lambda: keyed_noise(keys, shape, 0), device)
    report.add("keyed noise, CPU generator per key", len(keys) / seconds, None)
    seconds, on_device = timed(lambda: keyed_noise(keys, shape, 0, device), device)
    same = torch.equal(on_device.cpu(), on_cpu)
    assert same, "keyed noise: expected the same numbers on the device as on the CPU"
    note = f"pipeline.model.mersenne on {device.type}: equal to the CPU's, bit for bit"
    if device.type == "cpu":
        note = "the device is the CPU: the per-key loop again"
    report.add("keyed noise, vectorised generator", len(keys) / seconds, None, note)
    report.figures.update({"score_fp32": rate, "raw_forward_fp32": raw, "score_bf16": rate_bf16})


def sample_phase(flow: Flow, settings: Settings, report: Report) -> None:
    """Images/s of Flow.sample in chunks of up to 2,000 (z from a seeded CPU generator)."""
    count, chunk = settings.sample_images, min(settings.sample_images, 2_000)
    flow.sample(min(chunk, 8), 0.7, torch.Generator().manual_seed(0))  # warm-up

    def draw() -> list[torch.Tensor]:
        starts = range(0, count, chunk)
        return [
            flow.sample(min(chunk, count - i), 0.7, torch.Generator().manual_seed(i))
            for i in starts
        ]

    seconds, drawn = timed(draw, settings.torch_device)
    shapes = {tuple(images.shape[1:]) for images in drawn}
    assert shapes == {flow.config.image_shape} and all(x.dtype == torch.uint8 for x in drawn)
    report.add("sample (Flow.sample, temperature 0.7)", count / seconds, None, f"chunks of {chunk}")
    report.figures["sample"] = count / seconds


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_gaps(device_flow: Flow, loaded: Flow, images: np.ndarray) -> tuple[float, float]:
    """Largest per-image log p differences, in bits/dim, of the reloaded flow against (1) the
    device flow's weights copied to the CPU, both computed on the CPU: 0 when the checkpoint holds
    exactly the weights, and (2) the device flow computed on its device: the arithmetic gap."""
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
    metrics = run_step(training, config, torch.from_numpy(images), saved.step)
    assert math.isfinite(metrics.bits_per_dim) and not metrics.skipped, metrics
    return training


def save(directory: Path, training: Training, config: TrainConfig, step: int) -> None:
    state = TrainState(
        step=step,
        images_seen=step * config.batch_size,
        skipped_steps=0,
        optimizer=training.optimizer.state_dict(),  # moments on the training device
        rng=torch.get_rng_state(),
        history={"train": [], "validation": []},
        ema_updates=training.ema.updates,
    )
    save_checkpoint(directory, training.flow, training.ema.model, state, config.to_dict())


def checkpoint_phase(
    training: Training, data: dict[str, np.ndarray], settings: Settings, report: Report
) -> None:
    """Device checkpoint -> CPU (the same log p, one step), that CPU state -> device (one step)."""
    config, cpu, kind = base_config(settings), torch.device("cpu"), settings.torch_device.type
    batch = data["train"][:4]
    with tempfile.TemporaryDirectory() as tmp:
        on_device, on_cpu = Path(tmp) / "device", Path(tmp) / "cpu"
        save(on_device, training, config, settings.steps)
        _, ema, _ = load_checkpoint(on_device)
        exact, arithmetic = checkpoint_gaps(training.ema.model, ema, data["eval"][:64])
        assert exact == 0.0, f"reloaded log p: expected identical, found a gap of {exact:.2e}"
        resumed = resume_one_step(on_device, config, cpu, batch)
        save(on_cpu, resumed, config, settings.steps + 1)
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
        name = torch.cuda.get_device_name(device)
        where = f"{name}, CUDA {torch.version.cuda} (cuDNN fp32 convolutions in TF32, the default)"
    else:
        where = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    return f"{where}; torch {torch.__version__}; Python {platform.python_version()}"


def table(report: Report, settings: Settings, seconds: float) -> Table:
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    toy = " (small: a shrunken model, toy sizes)" if settings.small else ""
    title = f"GPU bench on {machine(settings.torch_device)}; {when}; {seconds:.0f} s{toy}"
    return Table(["what", "images/s", "bits/dim", "notes"], report.rows, title=title)


def phases(settings: Settings, report: Report) -> Iterator[str]:
    """Runs the phases one by one, yielding after each (so that the table can be written)."""
    config = base_config(settings)
    shape = config.model.image_shape
    data = {
        "train": smooth_images(settings.train_images, shape, seed=0),
        "eval": smooth_images(settings.eval_images, shape, seed=1),
    }
    print(f"GPU bench: {machine(settings.torch_device)}; {config.model}", flush=True)
    started = time.perf_counter()
    if settings.train_only:  # the CPU precision comparison
        precision_race(data, settings, report)
        yield "race"
        return
    training = train_phase(data, settings, report)
    assert training is not None
    yield "train"
    score_phase(training.ema.model, settings, report)
    yield "score"
    sample_phase(training.ema.model, settings, report)
    checkpoint_phase(training, data, settings, report)
    yield "sample and checkpoint"
    late = time.perf_counter() - started > settings.compile_after_seconds
    if not settings.compile or late:
        reason = "--no-compile" if not settings.compile else "the other phases took too long"
        report.add("train bf16, compiled", None, None, f"not run ({reason})")
    else:
        train_phase(data, settings, report, compiled=True)
    yield "compiled"


def run(settings: Settings, out: Path | None = None) -> Result:
    """Every phase on `settings.device` in a world-size-1 process group (NCCL on CUDA, gloo on
    the CPU); the table is rewritten to `out` after each phase."""
    started = time.perf_counter()
    device = settings.torch_device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # NCCL for CUDA tensors; gloo for CPU ones (the checkpoint phase resumes a step on the CPU).
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    report = Report()
    try:
        for _ in phases(settings, report):
            done = table(report, settings, time.perf_counter() - started)
            if out is not None:
                out.write_text(done.markdown() + "\n")
    finally:
        dist.destroy_process_group()
    return Result({"figures": report.figures}, [done])


def resolved(settings: Settings) -> Settings | None:
    """`settings` on a concrete device, or None when they ask for a GPU this machine lacks."""
    wanted = settings.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else ""
    if not wanted or (wanted.startswith("cuda") and not torch.cuda.is_available()):
        return None
    return replace(settings, device=wanted)


def measure(settings: Settings, run_in: Run) -> Result:
    """`flowray bench gpu`: every phase on the GPU (`device=cpu` for the CPU smoke)."""
    on_device = resolved(settings)
    if on_device is None:
        return Result({"skipped": NO_GPU}, [Table([], notes=[NO_GPU])])
    return run(on_device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench.gpu", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if any), cuda[:N] or cpu")
    parser.add_argument("--small", action="store_true", help="toy sizes, a shrunken model")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch size")
    parser.add_argument("--config", default="rgb32", help="preset name or YAML (model, optim)")
    parser.add_argument(
        "--train-only", action="store_true", help="only fp32 vs bf16, steps interleaved"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile run")
    parser.add_argument("--output", "--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    settings = Settings(**SMOKE) if args.small else Settings()
    settings = replace(settings, preset=args.config, train_only=args.train_only)
    settings = replace(
        settings, device=args.device, compile=settings.compile and not args.no_compile
    )
    if args.steps is not None:
        timed_from = max(1, min(settings.timed_from, args.steps // 5))
        settings = replace(settings, steps=args.steps, timed_from=timed_from)
    if args.batch_size is not None:
        settings = replace(settings, batch_size=args.batch_size)
    on_device = resolved(settings)
    if on_device is None:
        print(NO_GPU, flush=True)
        return 0
    result = run(on_device, Path(args.output) if args.output else None)
    print("\n" + result.markdown(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
