"""The GPU check: `python -m pipeline.bench.gpu [--out gpu.md]` (or `flowray bench --suite gpu`).

For a bare GPU box with PyTorch (CUDA), numpy, pandas, pyyaml, safetensors, pyarrow and Pillow
only: it imports no Ray, MLflow, webdataset, s3fs or fsspec. On one GPU, with a world-size-1 NCCL
process group so that the training collectives reduce GPU tensors, it

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
`--device cpu --small` runs every phase at toy sizes on the CPU (the test suite does this).
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
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from flowmodel import Flow, dequantize
from pipeline.bench.gpu_training import (
    Report,
    Settings,
    base_config,
    precision_race,
    smooth_images,
    timed,
    train_phase,
)
from pipeline.model.likelihood import keyed_noise, predict_frame
from pipeline.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from pipeline.train.config import TrainConfig
from pipeline.train.core import Training, run_step, start_training

__all__ = ["Settings", "main", "run"]

NO_GPU = "no CUDA device on this machine: the GPU bench did not run (--device cpu --small runs its CPU smoke)"


# ----------------------------------------------------------------------------- scoring, sampling


def raw_forward_rate(flow: Flow, images: np.ndarray, batch: int, device: torch.device) -> float:
    """Images/s of the flow's forward pass alone on already dequantized images on the device."""
    y = dequantize(torch.from_numpy(images[:batch]), flow.config.n_bits).to(device)
    rounds = max(1, min(len(images), 4 * batch) // batch)
    with torch.no_grad():
        flow.log_prob(y, check=False)  # warm-up: allocations, cuDNN algorithm choice
        seconds, _ = timed(device, lambda: [flow.log_prob(y, check=False) for _ in range(rounds)])
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

    seconds, _ = timed(device, work)
    bits = np.concatenate([frame["bits_per_dim"].to_numpy() for frame in frames])
    return len(images) / seconds, bits


def score_phase(flow: Flow, settings: Settings, report: Report) -> None:
    """predict_frame on `score_images` images in fp32 and bf16, against the raw forward pass."""
    device, batch = settings.device, settings.score_batch
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
    seconds, on_cpu = timed(device, lambda: keyed_noise(keys, shape, 0))
    report.add("keyed noise, CPU generator per key", len(keys) / seconds, None)
    seconds, on_device = timed(device, lambda: keyed_noise(keys, shape, 0, device))
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

    seconds, drawn = timed(settings.device, draw)
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
    config, cpu, kind = base_config(settings), torch.device("cpu"), settings.device.type
    batch = data["train"][:4]
    with tempfile.TemporaryDirectory() as tmp:
        on_device, on_cpu = Path(tmp) / "device", Path(tmp) / "cpu"
        save(on_device, training, config, settings.steps)
        _, ema, _ = load_checkpoint(on_device)
        exact, arithmetic = checkpoint_gaps(training.ema.model, ema, data["eval"][:64])
        assert exact == 0.0, f"reloaded log p: expected identical, found a gap of {exact:.2e}"
        resumed = resume_one_step(on_device, config, cpu, batch)
        save(on_cpu, resumed, config, settings.steps + 1)
        resume_one_step(on_cpu, config, settings.device, batch)
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


def markdown(report: Report, settings: Settings, seconds: float) -> str:
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    toy = " (--small: a shrunken model, toy sizes)" if settings.small else ""
    lines = [f"GPU bench on {machine(settings.device)}; {when}; {seconds:.0f} s{toy}", ""]
    lines += ["| what | images/s | bits/dim | notes |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {what} | {rate} | {bits} | {note} |" for what, rate, bits, note in report.rows]
    return "\n".join(lines)


def phases(settings: Settings, report: Report) -> Iterator[str]:
    """Runs the phases one by one, yielding after each (so that the table can be written)."""
    config = base_config(settings)
    shape = config.model.image_shape
    data = {
        "train": smooth_images(settings.train_images, shape, seed=0),
        "eval": smooth_images(settings.eval_images, shape, seed=1),
    }
    print(f"GPU bench: {machine(settings.device)}; {config.model}", flush=True)
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


def run(settings: Settings, out: Path | None = None) -> dict[str, Any]:
    """Every phase on `settings.device` in a world-size-1 process group (NCCL on CUDA, gloo on
    the CPU); the table, rewritten to `out` after each phase, and the figures."""
    started = time.perf_counter()
    if settings.device.type == "cuda":
        torch.cuda.set_device(settings.device)
    # NCCL for CUDA tensors; gloo for CPU ones (the checkpoint phase resumes a step on the CPU).
    backend = "cpu:gloo,cuda:nccl" if settings.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    report = Report()
    try:
        for _ in phases(settings, report):
            table = markdown(report, settings, time.perf_counter() - started)
            if out is not None:
                out.write_text(table + "\n")
    finally:
        dist.destroy_process_group()
    return {"markdown": table, "figures": report.figures}


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--out", default=None, help="also write the Markdown table to this file")
    return parser


def settings_from(args: argparse.Namespace) -> Settings | None:
    """The run's settings, or None when it asks for a GPU this machine does not have."""
    wanted = args.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else ""
    if not wanted or (wanted.startswith("cuda") and not torch.cuda.is_available()):
        return None
    device = torch.device(wanted)
    if device.type == "cuda" and device.index is None:  # DDP's device_ids want an index
        device = torch.device("cuda", torch.cuda.current_device())
    settings = Settings.toy(device) if args.small else Settings(device)
    if args.steps is not None:
        timed_from = max(1, min(settings.timed_from, args.steps // 5))
        settings = replace(settings, steps=args.steps, timed_from=timed_from)
    if args.batch_size is not None:
        settings = replace(settings, batch_size=args.batch_size)
    compile_on = settings.compile and not args.no_compile
    return replace(settings, compile=compile_on, preset=args.config, train_only=args.train_only)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    if settings is None:
        print(NO_GPU, flush=True)
        return 0
    result = run(settings, Path(args.out) if args.out else None)
    print("\n" + result["markdown"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
