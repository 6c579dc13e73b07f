"""One training lever at a time against the preset, at an equal budget of step time, on the
Fashion-MNIST test split (`flowray bench ablation`).

Each lever (`LEVERS`: the preset with a few config overrides) is trained in a subprocess of its
own (`python -m pipeline.bench.ablation <spec.json> <result.json>`) for `minutes` of step time by
`harness.Racer`, then its EMA weights evaluated on the test split with keyed dequantization noise.
The parent runs `parallel` children at a time with `threads` torch threads each. A lever whose
config key this build lacks is shown as skipped with the reason; a combination drops such keys and
says which. Imports torch, numpy and PyYAML only (no Ray, MLflow or normflows).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from flowmodel.typed import ConfigError
from pipeline.bench import harness
from pipeline.bench.harness import Result, Run, Table


@dataclass(frozen=True)
class Lever:
    """One row: `overrides` ("key=value", as `flowray train --set` takes them) applied to the
    preset; `change` says what that means."""

    name: str
    change: str
    overrides: tuple[str, ...] = ()


LEVERS: tuple[Lever, ...] = (
    Lever("baseline", "the preset as it is"),
    # Three changes that went into the preset together, undone together.
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
    Lever("alpha0.05", "logit alpha 0.05 (RealNVP's)", ("model.logit_alpha=0.05",)),
    Lever("shift", "y - 0.5 instead of the logit (Glow)", ("model.preprocess=shift",)),
    # Capacity against steps at the same wall clock: the 1x1 conv's cost grows with width squared.
    Lever("width48", "conditioner width 48 (from 64)", ("model.hidden_channels=48",)),
    Lever("width96", "conditioner width 96 (from 64)", ("model.hidden_channels=96",)),
    Lever(
        "checkerboard", "checkerboard masks instead of channel halves", ("model.mask=checkerboard",)
    ),
)


@dataclass(frozen=True)
class Settings:
    preset: str = "fashion-mnist"  # the training preset the levers change
    levers: tuple[str, ...] | None = None  # None: all of LEVERS
    minutes: float = 10.0  # step time per lever
    parallel: int = 1  # levers trained side by side
    threads: int | None = None  # torch threads per lever (None: the cores shared evenly)
    train_images: int | None = None  # the first N (None: all)
    test_images: int | None = None  # the first N (None: all)
    max_steps: int | None = None  # also stop each lever after this many steps


SMOKE = {
    "levers": ["baseline", "cosine"],
    "minutes": 0.05,
    "train_images": 1024,
    "test_images": 256,
    "max_steps": 3,
}


@dataclass(frozen=True)
class ResolvedLever:
    """A lever against this build's config: the overrides that load, and those that do not (why)."""

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


def resolve(lever: Lever, preset: str) -> ResolvedLever:
    """Each override tried alone on `preset`: one that names a key this build lacks (or a value
    it refuses) is dropped with the error's message."""
    kept, dropped = [], {}
    for override in lever.overrides:
        try:
            harness.preset_config(preset, [override])
        except (ConfigError, ValueError) as err:
            dropped[override.split("=", 1)[0]] = str(err).splitlines()[0]
        else:
            kept.append(override)
    return ResolvedLever(lever, tuple(kept), dropped)


def train_lever(settings: Settings, lever: str, overrides: Sequence[str]) -> dict[str, Any]:
    """The figures of one table row, trained in this process."""
    config = harness.preset_config(settings.preset, overrides)
    with harness.torch_threads(settings.threads):
        _, train = harness.fashion_mnist("train", settings.train_images)
        keys, test = harness.fashion_mnist("test", settings.test_images)
        flow = harness.preset_flow(config.model, train[: config.init_images], config.seed)
        budget = {"seconds": 60 * settings.minutes, "max_steps": settings.max_steps}
        racer = harness.Racer(flow, train, config, **budget)
        load = [harness.load_average()]
        wall, _ = harness.timed(lambda: harness.run_race({lever: racer}, print))
        load.append(harness.load_average())
        figures = racer.tested(keys, test)
    return {
        "lever": lever,
        "overrides": list(overrides),
        **figures,
        "batch_size": racer.batch_size,
        "train_wall_seconds": wall,
        "threads": settings.threads,
        "load_average": load,
    }


def _spawn(
    settings: Settings, lever: ResolvedLever, folder: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """One lever trained in a subprocess (`main`): its figures, or why it failed."""
    name = lever.lever.name
    spec, log_path, result = (folder / f"{name}.{end}" for end in ("spec.json", "log", "json"))
    result.unlink(missing_ok=True)
    child = {"settings": asdict(settings), "lever": name, "overrides": lever.overrides}
    spec.write_text(json.dumps(child))
    # Each BLAS/OpenMP pool sized like torch's, so that N children share the cores evenly.
    threads = str(settings.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    log(f"{name}: started ({' '.join(lever.overrides) or 'no overrides'})")
    command = [sys.executable, "-m", "pipeline.bench.ablation", str(spec), str(result)]
    with log_path.open("w") as output:
        code = subprocess.run(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    if code.returncode != 0 or not result.exists():
        tail = log_path.read_text().strip().splitlines()[-1:] or [""]
        log(f"{name}: failed (exit {code.returncode}): {tail[0]}; log: {log_path}")
        return {"error": f"exit {code.returncode}: {tail[0]}", "log": str(log_path)}
    figures = json.loads(result.read_text())
    log(
        f"{name}: {figures['steps']} steps, {figures['images_per_second']:.0f} images/s, "
        f"test {figures['test_bits_per_dim']:.4f} bits/dim"
    )
    return figures


def measure(settings: Settings, run: Run) -> Result:
    """Results under <output>/ablation/<lever>.json and .log."""
    known = {lever.name: lever for lever in LEVERS}
    unknown = [name for name in settings.levers or () if name not in known]
    if unknown:
        raise ValueError(f"unknown levers {unknown}: expected some of {list(known)}")
    parallel = max(1, settings.parallel)
    threads = settings.threads or max(1, (os.cpu_count() or 1) // parallel)
    settings = replace(settings, parallel=parallel, threads=threads)
    folder = run.output / "ablation"
    folder.mkdir(parents=True, exist_ok=True)
    resolved = [resolve(known[name], settings.preset) for name in settings.levers or known]
    runnable = [r for r in resolved if r.runnable]
    for r in resolved:
        if not r.runnable:
            run.log(f"{r.lever.name}: skipped ({'; '.join(r.dropped.values())})")
    run.log(
        f"{len(runnable)} levers, {settings.minutes:g} min of step time each, {parallel} at a "
        f"time with {threads} threads each"
    )
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        trained = list(pool.map(lambda r: _spawn(settings, r, folder, run.log), runnable))
    by_name = {r.lever.name: figures for r, figures in zip(runnable, trained, strict=True)}
    rows = []
    for r in resolved:
        skipped = {"skipped": "; ".join(f"{k}: {v}" for k, v in r.dropped.items())}
        figures = by_name.get(r.lever.name, skipped)
        rows.append(
            {"lever": r.lever.name, "change": r.change, "overrides": r.overrides, **figures}
        )
    after = [round(x, 2) for x in os.getloadavg()]
    report = {"settings": {**asdict(settings), "load_average_after": after}, "levers": rows}
    return Result(report, [table(report)])


def table(report: dict[str, Any]) -> Table:
    rows = report["levers"]
    base = next((r.get("test_bits_per_dim") for r in rows if r["lever"] == "baseline"), None)

    def delta(row: dict[str, Any]) -> str:
        bits = row.get("test_bits_per_dim")
        if base is None or bits is None or not math.isfinite(base) or not math.isfinite(bits):
            return "n/a"
        return f"{bits - base:+.3f}"

    cells = []
    for row in rows:
        if "test_bits_per_dim" in row:
            rate = f"{row['images_per_second']:,.0f}"  # a rate, not a count: no decimals
            bits = f"{row['test_bits_per_dim']:.4f}"
            cells.append([row["lever"], row["change"], row["steps"], rate, bits, delta(row)])
        else:
            why = row.get("skipped") or row.get("error", "")
            status = "skipped" if "skipped" in row else "failed"
            cells.append([row["lever"], f"{row['change']}: {status} ({why})", "", "", "", ""])
    settings = report["settings"]
    tests = {r["test_images"] for r in rows if "test_images" in r}
    return Table(
        ["lever", "what changed", "steps", "images/s", "test bits/dim (EMA)", "vs baseline"],
        cells,
        [
            f"Preset {settings['preset']}; {settings['minutes']:g} min of step time per lever, "
            f"{settings['parallel']} lever(s) side by side with {settings['threads']} torch "
            f"thread(s) each; test bits/dim of the EMA weights on "
            f"{', '.join(f'{c:,}' for c in sorted(tests)) or 'no'} test images (keyed "
            "dequantization noise); images/s is the median over 20-step windows of step time; "
            f"load average {settings['load_average_after'][0]} at the end."
        ],
    )


def main(argv: list[str] | None = None) -> int:
    """One lever in this process: `python -m pipeline.bench.ablation <spec.json> <result.json>`,
    the spec as `_spawn` wrote it; the result is written whole or not at all."""
    spec_path, result_path = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(spec_path).read_text())
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    figures = train_lever(Settings(**spec["settings"]), spec["lever"], spec["overrides"])
    result = Path(result_path)
    partial = result.with_suffix(".tmp")
    partial.write_text(json.dumps(figures, indent=2) + "\n")
    partial.replace(result)  # the parent reads only complete results
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
