"""`flowray bench`: benchmarks side by side; each suite prints a Markdown table and writes
<out>/<suite>.json and <out>/<suite>.md.

    flowray bench                                   # every suite, full size (about an hour on 2 cores)
    flowray bench --suite quality --minutes 10      # flowray vs normflows test bits/dim at 10 min each
    flowray bench --suite training --repeats 3      # images/s: in-process, Ray Train 1 and 2 workers, normflows
    flowray bench --smoke                           # every suite in seconds (the test suite runs this)
    flowray bench --suite ablation --minutes 10 --parallel 7 --threads 2   # one row per lever

Suites: quality (pipeline.bench.quality), training (pipeline.bench.training), scoring
(pipeline.bench.scoring), scaling (pipeline.bench.scaling), io (pipeline.bench.shard_io), gpu
(pipeline.bench.gpu: training, scoring, sampling and checkpoints on one CUDA device; skipped
without one, and --smoke runs it at toy sizes). Not in `all`: ablation (pipeline.bench.ablation:
the preset with one training or model lever changed per row, each trained for --minutes in a
subprocess; runs without Ray or MLflow installed). Only ratios and side-by-side figures from one run
mean anything on a shared machine; every report carries the machine and its load average.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["SUITES", "build_parser", "main"]

SUITES = ("quality", "training", "scoring", "sampling", "scaling", "io", "serving", "gpu")
# Selectable by name, not run by `all` (an hour and more at full size).
EXTRA_SUITES = ("ablation",)


def build_parser() -> argparse.ArgumentParser:
    from jobs.config import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="flowray bench",
        description="Benchmarks side by side: model quality against normflows, training and "
        "scoring throughput, scaling and shard I/O. Writes <out>/<suite>.json and .md.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--suite", choices=[*SUITES, *EXTRA_SUITES, "all"], default="all")
    parser.add_argument(
        "--smoke", action="store_true", help="seconds-long version of every suite (tiny sizes)"
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=10.0,
        help="quality: training budget per model; ablation: per lever",
    )
    parser.add_argument(
        "--levers",
        default=None,
        help="ablation: comma-separated levers (default: all; --smoke: baseline,cosine)",
    )
    parser.add_argument(
        "--parallel", type=int, default=1, help="ablation: levers trained side by side"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="ablation: torch threads per lever (default: cores / --parallel)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=60.0,
        help="training: seconds of training per run; serving: most seconds per level",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="training, io, scoring: runs per measurement"
    )
    parser.add_argument(
        "--scaling-sizes",
        default="10000,30000,100000",
        help="scaling: comma-separated image counts (1000000 takes ~15 min more on 2 cores)",
    )
    parser.add_argument(
        "--serving-requests",
        type=int,
        default=1000,
        help="serving: most requests per level of concurrency (1, 8, 64 clients)",
    )
    parser.add_argument("--config", default="fashion-mnist", help="training preset (or YAML)")
    parser.add_argument("--out", default="bench-results", help="folder for the JSON and .md")
    parser.add_argument(
        "--workdir",
        default=None,
        help="prepared shards, runs and stores the suites keep between runs (default: <out>/work)",
    )
    return parser


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _finite_json(value: Any) -> Any:
    """NaN and inf as null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def _write(out: Path, suite: str, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report = {"suite": suite, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **report}
    text = json.dumps(_finite_json(report), indent=2, default=_json_default)
    (out / f"{suite}.json").write_text(text + "\n")
    (out / f"{suite}.md").write_text(f"## {suite}\n\n{report.get('markdown', '')}\n")


def _quality(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from pipeline.bench import quality as bench_quality

    config = _preset(args)
    if args.smoke:
        return bench_quality.run(
            config, minutes=0.05, train_images=1024, test_images=256, max_steps=3
        )
    return bench_quality.run(config, minutes=args.minutes)


def _training(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from dataclasses import replace

    from pipeline.bench import training as bench_training

    config = _preset(args)
    if args.smoke:
        config = replace(config, init_images=64, eval_batch_size=64)
        return bench_training.run(
            config,
            seconds=2,
            repeats=1,
            workdir=workdir / "training",
            train_images=512,
            max_steps=3,
            log_every=1,
        )
    return bench_training.run(
        config, seconds=args.seconds, repeats=args.repeats, workdir=workdir / "training"
    )


def _scoring(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from pipeline.bench import scoring as bench_scoring

    if args.smoke:
        return bench_scoring.run(images=128, repeats=1, growth=2, sample_images=16)
    return bench_scoring.run(repeats=args.repeats, workdir=str(workdir / "scoring"))


def _sampling(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from pipeline.bench import sampling as bench_sampling

    if args.smoke:
        return bench_sampling.run(images=64, repeats=1)
    return bench_sampling.run(repeats=args.repeats, workdir=str(workdir / "sampling"))


def _scaling(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from pipeline.bench import scaling as bench_scaling

    config = _preset(args)
    if args.smoke:
        return bench_scaling.run(
            [256, 512],
            workdir=workdir / "scaling-smoke",
            model_config=config.model,
            base_images=256,
            shard_samples=128,
            batch_size=128,
            fresh_ray=False,
        )
    sizes = [int(s) for s in args.scaling_sizes.split(",") if s.strip()]
    return bench_scaling.run(sizes, workdir=workdir / "scaling", model_config=config.model)


def _io(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from pipeline.bench import shard_io as bench_io

    if args.smoke:
        return bench_io.run(n_images=200, repeats=1, shard_samples=100)
    return bench_io.run(repeats=args.repeats)


def _serving(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from pipeline.bench import serving as bench_serving

    model = _preset(args).model
    if args.smoke:
        return bench_serving.run(model, requests=48, seconds=10, images=64)
    return bench_serving.run(model, requests=args.serving_requests, seconds=args.seconds)


def _ablation(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from pipeline.bench import ablation as bench_ablation

    levers = args.levers.split(",") if args.levers else None
    common: dict[str, Any] = {
        "parallel": args.parallel,
        "threads": args.threads,
        "preset": args.config,
        "out": Path(args.out),
    }
    if args.smoke:
        return bench_ablation.run(
            levers or ["baseline", "cosine"],
            minutes=0.05,
            train_images=1024,
            test_images=256,
            max_steps=3,
            **common,
        )
    return bench_ablation.run(levers, minutes=args.minutes, **common)


def _gpu(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        reason = (
            "no CUDA device on this machine: GPU suite skipped "
            "(python -m pipeline.bench.gpu --device cpu --small runs its CPU smoke)"
        )
        return {"skipped": reason, "markdown": reason}
    from pipeline.bench import gpu as bench_gpu

    device = torch.device("cuda")
    settings = bench_gpu.Settings.toy(device) if args.smoke else bench_gpu.Settings(device)
    return bench_gpu.run(settings)


RUNNERS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "quality": _quality,
    "training": _training,
    "scoring": _scoring,
    "sampling": _sampling,
    "scaling": _scaling,
    "io": _io,
    "serving": _serving,
    "gpu": _gpu,
    "ablation": _ablation,
}


def _preset(args: argparse.Namespace) -> Any:
    from pipeline.config import load_config
    from pipeline.train.config import TrainConfig

    return load_config(TrainConfig, args.config, [])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Progress must reach a log file (nohup ... > log) as it happens, not at exit.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    # normflows calls torch.lu, deprecated in torch 2.x: one warning per step otherwise.
    warnings.filterwarnings("ignore", message=r"torch\.lu is deprecated")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"normflows")
    out = Path(args.out)
    workdir = Path(args.workdir) if args.workdir else out / "work"
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    failed = []
    for suite in suites:
        print(f"\n## {suite}\n", flush=True)
        started = time.perf_counter()
        try:
            report = RUNNERS[suite](args, workdir)
        except Exception as err:  # one suite failing should not lose the others' results
            failed.append(suite)
            print(f"{suite}: failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            continue
        report["seconds"] = time.perf_counter() - started
        _write(out, suite, report)
        print(report.get("markdown") or report.get("skipped", ""), flush=True)
        print(f"\n({suite}: {report['seconds']:.0f} s; {out / suite}.json)", flush=True)
    if failed:
        print(f"failed suites: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
