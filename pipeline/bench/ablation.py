"""`flowray bench --suite ablation`: one training lever at a time against the preset, at an equal
budget, on the full Fashion-MNIST test split.

    report = run(["baseline", "cosine"], minutes=10, parallel=1, threads=2, out=Path("bench"))
    print(report["markdown"])

Each lever is the preset (`jobs/configs/fashion-mnist.yaml`) with a few config overrides
(`LEVERS`: each a change from the preset, which is the winning combination), trained in a
subprocess of its own (`python -m pipeline.bench.ablation --lever ...`) for `minutes` of step time
by the in-process machinery of the quality suite (`pipeline.bench.race`):
`pipeline.train.step.train_step`, the preset's optimizer, learning-rate schedule, clipping and EMA
as the Ray Train job runs them, at the job's global batch (`race.global_batch`), one seeded permutation of the training
split per epoch, the same ActNorm initialisation batch. Then its EMA weights are evaluated on the
whole 10,000-image test split with keyed dequantization noise (`evaluate_bits_per_dim`, the
figure the demo and scoring report). Each subprocess writes its figures as JSON; the parent runs
`parallel` of them at a time with `threads` torch threads each and assembles one table.

A lever whose config key does not exist in this build (a model option not landed yet) is shown as
skipped with the reason; a combination drops such keys and says which.

Imports torch, numpy, pandas and PyYAML only (no Ray, MLflow, fsspec or normflows): it runs on a
machine with nothing else installed, reading the IDX files in FASHION_MNIST_DIR.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LEVERS", "Lever", "ResolvedLever", "markdown", "resolve", "run", "train_lever"]

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Lever:
    """One row of the ablation: `overrides` ("key=value", as `flowray train --set` takes them)
    applied to the preset; `change` says what that means, for the table."""

    name: str
    change: str
    overrides: tuple[str, ...] = ()


LEVERS: tuple[Lever, ...] = (
    Lever("baseline", "the preset as it is"),
    # The preset before issue 16 (the demo's recipe until then): peak lr 1e-3, global batch 128,
    # logit alpha 0.05.
    Lever(
        "old-preset",
        "lr 1e-3, global batch 128, logit alpha 0.05",
        ("optim.lr=1e-3", "batch_size=64", "model.logit_alpha=0.05"),
    ),
    Lever("lr1e-3", "peak lr 1e-3 (half)", ("optim.lr=1e-3",)),
    Lever("lr3e-3", "peak lr 3e-3 (1.5x)", ("optim.lr=3e-3",)),
    Lever("cosine", "cosine decay to 0 over the budget", ("optim.schedule=cosine",)),
    Lever("linear", "linear decay to 0 over the budget", ("optim.schedule=linear",)),
    Lever("adamax", "Adamax instead of Adam, same lr", ("optim.optimizer=adamax",)),
    Lever("batch32", "global batch 32 (lr unchanged)", ("batch_size=16",)),
    Lever("batch128", "global batch 128 (lr unchanged)", ("batch_size=64",)),
    Lever("ema0.995", "EMA decay 0.995", ("optim.ema_decay=0.995",)),
    Lever("ema0.9995", "EMA decay 0.9995", ("optim.ema_decay=0.9995",)),
    Lever(
        "gated_resnet",
        "gated residual conditioner (Flow++)",
        ("model.conditioner=gated_resnet",),
    ),
    Lever(
        "variational",
        "variational dequantization (Flow++)",
        ("model.dequantization=variational",),
    ),
    Lever("split-clamp8", "split priors' log-sigma clamped to +-8", ("model.split_clamp=8",)),
    # Preprocessing: the preset takes MAF's logit alpha for MNIST, 1e-6 (Papamakarios et al. 2017
    # used 1e-6 on MNIST, 0.05 on CIFAR-10 as RealNVP). Glow shifts instead of the logit.
    Lever("alpha0.05", "logit alpha 0.05 (the preset until round 2)", ("model.logit_alpha=0.05",)),
    Lever("shift", "y - 0.5 instead of the logit (Glow)", ("model.preprocess=shift",)),
    # Capacity against steps at the same wall clock: the 1x1 conv's cost grows with width squared.
    Lever("width48", "conditioner width 48 (from 64)", ("model.hidden_channels=48",)),
    Lever("width96", "conditioner width 96 (from 64)", ("model.hidden_channels=96",)),
    Lever(
        "checkerboard", "checkerboard masks instead of channel halves", ("model.mask=checkerboard",)
    ),
)


@dataclass(frozen=True)
class ResolvedLever:
    """A lever against this build's config: the overrides that load, those that do not (with
    why), and whether anything is left to run."""

    lever: Lever
    overrides: tuple[str, ...]
    dropped: dict[str, str] = field(default_factory=dict)

    @property
    def runnable(self) -> bool:
        return not self.lever.overrides or bool(self.overrides)

    @property
    def change(self) -> str:
        if not self.dropped:
            return self.lever.change
        return f"{self.lever.change} (without {', '.join(self.dropped)}: not in this build)"


def _load(preset: str, overrides: Sequence[str]) -> Any:
    from pipeline.config import load_config
    from pipeline.train.config import TrainConfig

    return load_config(TrainConfig, preset, list(overrides))


def resolve(lever: Lever, preset: str) -> ResolvedLever:
    """Each override tried alone on `preset`: one that names a key this build lacks (or a value
    it refuses) is dropped with the error's message."""
    from flowmodel.typed import ConfigError

    kept, dropped = [], {}
    for override in lever.overrides:
        try:
            _load(preset, [override])
        except (ConfigError, ValueError) as err:
            dropped[override.split("=", 1)[0]] = str(err).splitlines()[0]
        else:
            kept.append(override)
    return ResolvedLever(lever, tuple(kept), dropped)


# ----------------------------------------------------------------------------- one lever


def train_lever(
    config: Any,
    minutes: float,
    *,
    threads: int,
    train_images: int | None = None,
    test_images: int | None = None,
    max_steps: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train `config`'s model in this process for `minutes` of step time and evaluate its EMA
    weights on the test split. Returns the figures of one table row."""
    import torch

    from pipeline.bench.common import fashion_mnist
    from pipeline.bench.race import global_batch, initialized_flow, make_contender, parameter_count
    from pipeline.train.step import evaluate_bits_per_dim, train_step

    torch.set_num_threads(threads)
    _, train = fashion_mnist("train", train_images)
    keys, test = fashion_mnist("test", test_images)
    flow = initialized_flow(config, train[: config.init_images])
    clip = config.optim.max_grad_norm
    contender = make_contender(
        flow,
        lambda m, b, o, g: train_step(m, b, o, max_grad_norm=clip, generator=g),
        train,
        config,
        batch_size=global_batch(config),
        seconds=60 * minutes,
        max_steps=max_steps,
    )
    trainer = contender.trainer
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    while not trainer.done:
        trainer.advance()
        if trainer.steps % 500 == 0:
            log(f"step {trainer.steps}, {trainer.elapsed:.0f} s, train {trainer.loss:.3f} bits/dim")
    wall = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    evaluated = time.perf_counter()
    size = config.eval_batch_size
    chunks = [(keys[i : i + size], test[i : i + size]) for i in range(0, len(test), size)]
    bits, count = evaluate_bits_per_dim(contender.ema.model, chunks, config.eval_seed)
    result = trainer.result()
    return {
        "params": parameter_count(flow),
        "steps": result.steps,
        "batch_size": global_batch(config),
        "train_seconds": result.seconds,
        "train_wall_seconds": wall,
        "images_seen": result.steps * global_batch(config),
        "images_per_second": result.images_per_second,
        "last_train_bits_per_dim": result.last_loss,
        "skipped_steps": contender.skipped,
        "test_bits_per_dim": bits,
        "test_images": count,
        "eval_seconds": time.perf_counter() - evaluated,
        "threads": threads,
        "load_average": [round(load_before, 2), round(load_after, 2)],
    }


# ----------------------------------------------------------------------------- the suite


def _child(
    resolved: ResolvedLever,
    preset: str,
    minutes: float,
    threads: int,
    folder: Path,
    sizes: dict[str, int | None],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """One lever in a subprocess with `threads` threads; its JSON result (or why it failed)."""
    name = resolved.lever.name
    result_path, log_path = folder / f"{name}.json", folder / f"{name}.log"
    result_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pipeline.bench.ablation", "--lever", name]
    command += ["--config", preset, "--minutes", str(minutes), "--threads", str(threads)]
    command += ["--result", str(result_path)]
    for override in resolved.overrides:
        command += ["--set", override]
    for option, value in sizes.items():
        if value is not None:
            command += [f"--{option.replace('_', '-')}", str(value)]
    # Each BLAS/OpenMP pool sized like torch's, so that N children share the cores evenly.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if env.get("FASHION_MNIST_DIR"):
        env["FASHION_MNIST_DIR"] = str(Path(env["FASHION_MNIST_DIR"]).resolve())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    log(f"{name}: started ({' '.join(resolved.overrides) or 'no overrides'})")
    with log_path.open("w") as output:
        code = subprocess.run(
            command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT
        ).returncode
    if code != 0 or not result_path.exists():
        tail = log_path.read_text().strip().splitlines()[-1:] or [""]
        log(f"{name}: failed (exit {code}): {tail[0]}; log: {log_path}")
        return {"error": f"exit {code}: {tail[0]}", "log": str(log_path)}
    figures = json.loads(result_path.read_text())
    log(
        f"{name}: {figures['steps']} steps, {figures['images_per_second']:.0f} images/s, "
        f"test {figures['test_bits_per_dim']:.4f} bits/dim"
    )
    return figures


def run(
    levers: Sequence[str] | None = None,
    minutes: float = 10.0,
    *,
    parallel: int = 1,
    threads: int | None = None,
    preset: str = "fashion-mnist",
    out: Path = Path("bench-results"),
    train_images: int | None = None,
    test_images: int | None = None,
    max_steps: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Each lever (default: all of `LEVERS`) trained for `minutes` of step time, `parallel` at a
    time with `threads` torch threads each (default: the cores shared evenly); results under
    <out>/ablation/<lever>.json and .log. Returns {"machine", "settings", "levers", "markdown"}."""
    from pipeline.bench.common import machine

    known = {lever.name: lever for lever in LEVERS}
    names = list(levers or known)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown levers {unknown}: expected some of {list(known)}")
    parallel = max(1, parallel)
    threads = threads or max(1, (os.cpu_count() or 1) // parallel)
    folder = (out / "ablation").resolve()  # absolute: the children run in the repository
    folder.mkdir(parents=True, exist_ok=True)
    resolved = [resolve(known[name], preset) for name in names]
    sizes = {"train_images": train_images, "test_images": test_images, "max_steps": max_steps}
    report: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "preset": preset,
            "minutes": minutes,
            "parallel": parallel,
            "threads": threads,
            **sizes,
        },
    }
    runnable = [r for r in resolved if r.runnable]
    for r in resolved:
        if not r.runnable:
            log(f"{r.lever.name}: skipped ({'; '.join(r.dropped.values())})")
    log(
        f"{len(runnable)} levers, {minutes:g} min of step time each, {parallel} at a time with "
        f"{threads} threads each"
    )
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        figures = list(
            pool.map(
                lambda r: _child(r, preset, minutes, threads, folder, sizes, log),
                runnable,
            )
        )
    by_name = {r.lever.name: f for r, f in zip(runnable, figures, strict=True)}
    report["levers"] = [
        {
            "lever": r.lever.name,
            "change": r.change,
            "overrides": list(r.overrides),
            **(
                by_name[r.lever.name]
                if r.runnable
                else {"skipped": "; ".join(f"{k}: {v}" for k, v in r.dropped.items())}
            ),
        }
        for r in resolved
    ]
    report["settings"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report["markdown"] = markdown(report)
    return report


def markdown(report: dict[str, Any]) -> str:
    """The table: lever, what changed, steps, images/s, test bits/dim, delta against baseline."""
    from pipeline.bench.common import markdown_table

    rows = report["levers"]
    base = next((r.get("test_bits_per_dim") for r in rows if r["lever"] == "baseline"), None)

    def delta(row: dict[str, Any]) -> str:
        bits = row.get("test_bits_per_dim")
        if base is None or bits is None or not math.isfinite(base) or not math.isfinite(bits):
            return "n/a"
        return f"{bits - base:+.3f}"

    table = []
    for row in rows:
        if "test_bits_per_dim" in row:
            table.append(
                [
                    row["lever"],
                    row["change"],
                    row["steps"],
                    f"{row['images_per_second']:,.0f}",  # a rate, not a count: no decimals
                    f"{row['test_bits_per_dim']:.4f}",
                    delta(row),
                ]
            )
        else:
            why = row.get("skipped") or row.get("error", "")
            status = "skipped" if "skipped" in row else "failed"
            table.append([row["lever"], f"{row['change']}: {status} ({why})", "", "", "", ""])
    headers = ["lever", "what changed", "steps", "images/s", "test bits/dim (EMA)", "vs baseline"]
    settings, info = report["settings"], report["machine"]
    test_counts = {r["test_images"] for r in rows if "test_images" in r}
    lines = [
        markdown_table(headers, table),
        "",
        f"Preset {settings['preset']}; {settings['minutes']:g} min of step time per lever, "
        f"{settings['parallel']} lever(s) side by side with {settings['threads']} torch "
        f"thread(s) each; test bits/dim of the EMA weights on "
        f"{', '.join(f'{c:,}' for c in sorted(test_counts)) or 'no'} test images (keyed "
        "dequantization noise); images/s is the median over 20-step windows of step time.",
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, load average "
        f"{info['load_average'][0]} at start, {settings['load_average_after'][0]} at the end.",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- subprocess


def main(argv: list[str] | None = None) -> int:
    """One lever in this process (what `run` starts per lever): writes its figures to --result."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.ablation")
    parser.add_argument("--lever", required=True)
    parser.add_argument("--config", default="fashion-mnist")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--result", required=True, help="JSON file for the figures")
    parser.add_argument("--train-images", type=int, default=None)
    parser.add_argument("--test-images", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    config = _load(args.config, args.overrides)
    figures = train_lever(
        config,
        args.minutes,
        threads=args.threads,
        train_images=args.train_images,
        test_images=args.test_images,
        max_steps=args.max_steps,
        log=lambda line: print(f"[{args.lever}] {line}"),
    )
    figures = {"lever": args.lever, "overrides": args.overrides, **figures}
    result = Path(args.result)
    partial = result.with_suffix(".tmp")
    partial.write_text(json.dumps(figures, indent=2) + "\n")
    partial.replace(result)  # whole or absent: the parent reads only complete results
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
