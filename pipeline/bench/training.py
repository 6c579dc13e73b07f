"""Training throughput: flowray's model through Ray Train (1 and 2 workers) against a plain
in-process loop of the same model, and against normflows' Glow at a matched parameter count.

All runs use the same global batch: the preset's per-worker batch times its worker count, split
evenly over the Ray workers. Per repeat, in this order:

- in-process: flowray (`pipeline.train.step.train_step` + warmup + EMA, the Ray loop's work
  without Ray) and normflows (`race.normflows_step`), alternating steps, each for `seconds` of
  step time, on Fashion-MNIST held in memory, torch using every core.
- Ray Train, 1 worker with all cores, then 2 workers with 1 core each: `pipeline.train.driver.train`,
  the production job (Ray Data reading the prepared shards, DDP for 2 workers, rank-0 MLflow
  logging), for `seconds` of training; its logged per-window images/s, the first window (startup)
  left out. Evaluation, checkpoints and registration happen after the timed windows.

Images/s of a run is the median of its per-window rates; a row is the median over repeats; a ratio
is the median of the per-repeat ratios. Targets: Ray 2 workers / in-process >= 0.9, flowray /
normflows in-process >= 1.3.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from pipeline.bench.harness import (
    Result,
    Run,
    Table,
    fashion_mnist,
    local_ray,
    median,
    prepared_fashion_mnist,
    torch_threads,
)
from pipeline.bench.race import parameter_count, race, train_interleaved
from pipeline.config import load_config
from pipeline.train.config import TrainConfig

__all__ = ["SMOKE", "TARGET_FLOWRAY_VS_NORMFLOWS", "TARGET_RAY_OVERHEAD", "Settings", "measure"]

TARGET_RAY_OVERHEAD = 0.9  # Ray 2 workers / in-process images/s
TARGET_FLOWRAY_VS_NORMFLOWS = 1.3


@dataclass(frozen=True)
class Settings:
    """Attributes:
    preset: the training preset (model, per-worker batch x workers = the global batch, optimizer).
    config_overrides: `key=value` changes to the preset.
    seconds: training time per run (Ray runs: their max_minutes; startup comes on top).
    repeats: runs of each kind; medians reported.
    train_images: the first N training images (None: all).
    max_steps: also stop each run after this many steps.
    log_every: steps per logged images/s window in the Ray runs.
    """

    preset: str = "fashion-mnist"
    config_overrides: tuple[str, ...] = ()
    seconds: float = 60.0
    repeats: int = 3
    train_images: int | None = None
    max_steps: int | None = None
    log_every: int = 25


SMOKE = {
    "config_overrides": ["init_images=64", "eval_batch_size=64"],
    "seconds": 2.0,
    "repeats": 1,
    "train_images": 512,
    "max_steps": 3,
    "log_every": 1,
}


def _in_process(
    config: TrainConfig, images: torch.Tensor, batch: int, seconds: float, max_steps: int | None
) -> dict[str, float]:
    """flowray and normflows, alternating steps in this process: median window images/s each."""
    contenders = race(
        config, images, seconds=seconds, max_steps=max_steps, batch_size=batch, window_steps=10
    )
    results = train_interleaved({name: c.trainer for name, c in contenders.items()})
    figures = {name: result.images_per_second for name, result in results.items()}
    params = {f"{name}_params": parameter_count(c.model) for name, c in contenders.items()}
    return figures | params


def _thread_probe(cpus: float) -> int:
    """torch threads in a fresh Ray worker holding `cpus` CPUs, as a Train worker is (Ray sets
    OMP_NUM_THREADS from them; max_calls=1, as a reused worker keeps the threads of its first task)."""
    import ray

    @ray.remote(max_calls=1)
    def threads() -> int:
        import torch

        return torch.get_num_threads()

    return int(ray.get(threads.options(num_cpus=cpus).remote()))


def _ray_run(
    config: TrainConfig,
    workdir: Path,
    name: str,
    workers: int,
    global_batch: int,
    seconds: float,
    max_steps: int | None,
    log_every: int,
) -> tuple[float, str]:
    """One `pipeline.train.driver.train` run: the median of its logged images/s (first window left
    out), and why it stopped early ("" when it ran its time). A run that the non-finite guard
    stops still measured throughput until then: its windows are in MLflow, so the figure is
    kept and the reason reported beside it rather than losing the whole suite."""
    from mlflow.tracking import MlflowClient

    from pipeline.train.driver import TrainingStopped, train

    cores = os.cpu_count() or 1
    run_config = replace(
        config,
        batch_size=global_batch // workers,
        max_steps=max_steps or 1_000_000,
        max_minutes=seconds / 60,
        eval_every=1_000_000,
        checkpoint_every=1_000_000,
        log_every=log_every,
        data=replace(config.data, validation_limit=config.eval_batch_size),
        scaling=replace(
            config.scaling, num_workers=workers, cpus_per_worker=max(1, cores // workers)
        ),
        run=replace(config.run, name=name, storage_path=str(workdir / "runs")),
        mlflow=replace(
            config.mlflow,
            tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}",
            experiment="flowray-bench",
            registered_model="flowray-bench",
        ),
        workdir=str(workdir),
    )
    stopped = ""
    try:
        run_id = train(run_config).mlflow_run_id
    except TrainingStopped as error:
        stopped = str(error)
        run_id = _run_id(run_config.mlflow.tracking_uri, run_config.mlflow.experiment, name)
    history = MlflowClient(run_config.mlflow.tracking_uri).get_metric_history(
        run_id, "images_per_second"
    )
    rates = [m.value for m in sorted(history, key=lambda m: m.step)]
    if not rates:
        raise RuntimeError(f"{name} logged no images/s window before it stopped: {stopped}")
    return median(rates[1:] if len(rates) > 1 else rates), stopped


def _run_id(tracking_uri: str, experiment: str, run_name: str) -> str:
    """The MLflow run of a Ray Train run that raised before returning its result."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        filter_string=f"attributes.run_name = '{run_name}'",
        max_results=1,
    )
    if not found:
        raise RuntimeError(f"no MLflow run named {run_name} in experiment {experiment}")
    return found[0].info.run_id


def measure(settings: Settings, run: Run) -> Result:
    """Images/s in-process and through Ray Train; see the module docstring."""
    config = load_config(TrainConfig, settings.preset, list(settings.config_overrides))
    run.workdir.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    global_batch = config.batch_size * max(1, config.scaling.num_workers)
    data = run.workdir / f"data-{settings.train_images or 'all'}"
    train = prepared_fashion_mnist(
        str(data), settings.train_images, split="train", shard_samples=5000
    )
    test = prepared_fashion_mnist(str(data), settings.train_images, shard_samples=5000)
    config = replace(
        config,
        data=replace(config.data, train=train, validation=test),
        init_images=min(config.init_images, settings.train_images or config.init_images),
    )
    _, images = fashion_mnist("train", settings.train_images)
    with torch_threads(cores), local_ray(cores + 2, dashboard=True):
        threads = {"ray_1_worker": _thread_probe(cores), "ray_2_workers": _thread_probe(cores // 2)}
        samples, params, stopped = _measure(config, images, global_batch, settings, run)
    figures: dict[str, Any] = {
        "settings": {
            "global_batch": global_batch,
            "seconds_per_run": settings.seconds,
            "repeats": settings.repeats,
            "train_images": len(images),
            "log_every": settings.log_every,
            "threads": {
                "in_process": cores,
                "ray_1_worker": f"1 worker x {threads['ray_1_worker']} threads",
                "ray_2_workers": f"2 workers x {threads['ray_2_workers']} threads",
            },
            "params": params,
        },
        "samples": samples,
        "stopped_early": stopped,
        "images_per_second": {key: median(values) for key, values in samples.items()},
        "ratios": _ratios(samples),
    }
    ratios = figures["ratios"]
    figures["targets"] = {
        "ray_overhead": {
            "at_least": TARGET_RAY_OVERHEAD,
            "met": bool(ratios["ray_2_workers_vs_in_process"] >= TARGET_RAY_OVERHEAD),
        },
        "flowray_vs_normflows": {
            "at_least": TARGET_FLOWRAY_VS_NORMFLOWS,
            "met": bool(ratios["flowray_vs_normflows"] >= TARGET_FLOWRAY_VS_NORMFLOWS),
        },
    }
    return Result(figures, [_table(figures)])


def _measure(
    config: TrainConfig, images: torch.Tensor, global_batch: int, settings: Settings, run: Run
) -> tuple[dict[str, list[float]], dict[str, int], list[str]]:
    """Per repeat: the in-process pair, then Ray Train with 1 and 2 workers. Returns images/s per
    run kind and repeat, the two models' parameter counts, and a line per Ray run that stopped
    early (its images/s until then are among the samples)."""
    samples: dict[str, list[float]] = {
        "flowray_in_process": [],
        "normflows_in_process": [],
        "ray_1_worker": [],
        "ray_2_workers": [],
    }
    params: dict[str, int] = {}
    stopped: list[str] = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    seconds, max_steps, repeats = settings.seconds, settings.max_steps, settings.repeats
    log = run.log
    for repeat in range(repeats):
        log(f"repeat {repeat + 1}/{repeats}: in-process flowray and normflows")
        figures = _in_process(config, images, global_batch, seconds, max_steps)
        samples["flowray_in_process"].append(figures["flowray"])
        samples["normflows_in_process"].append(figures["normflows"])
        params = {"flowray": figures["flowray_params"], "normflows": figures["normflows_params"]}
        for key, workers in (("ray_1_worker", 1), ("ray_2_workers", 2)):
            log(f"repeat {repeat + 1}/{repeats}: Ray Train, {workers} worker(s)")
            rate, reason = _ray_run(
                config,
                run.workdir,
                f"bench-{stamp}-{key}-{repeat}",
                workers,
                global_batch,
                seconds,
                max_steps,
                settings.log_every,
            )
            samples[key].append(rate)
            if reason:
                log(f"repeat {repeat + 1}/{repeats}, {key}: {reason}")
                stopped.append(f"{key}, repeat {repeat + 1}: {reason}")
    return samples, params, stopped


def _ratios(samples: dict[str, list[float]]) -> dict[str, float]:
    """Ratios per repeat (both figures measured minutes apart, under similar load), then the
    median: on a shared machine a ratio of medians would pair figures from different loads."""

    def ratio(top: str, bottom: str) -> float:
        return median([a / b for a, b in zip(samples[top], samples[bottom])])

    return {
        "ray_2_workers_vs_in_process": ratio("ray_2_workers", "flowray_in_process"),
        "ray_1_worker_vs_in_process": ratio("ray_1_worker", "flowray_in_process"),
        "flowray_vs_normflows": ratio("flowray_in_process", "normflows_in_process"),
    }


def _table(report: dict[str, Any]) -> Table:
    """One row per run kind: threads, parameters, images/s and its ratio to flowray in-process."""
    settings, rates, ratios = report["settings"], report["images_per_second"], report["ratios"]
    threads, params = settings["threads"], settings["params"]
    in_process = f"1 process x {threads['in_process']} threads"
    rows = [
        ["flowray, in-process loop", in_process, "flowray", "flowray_in_process", 1.0],
        [
            "flowray, Ray Train 1 worker",
            threads["ray_1_worker"],
            "flowray",
            "ray_1_worker",
            ratios["ray_1_worker_vs_in_process"],
        ],
        [
            "flowray, Ray Train 2 workers (DDP)",
            threads["ray_2_workers"],
            "flowray",
            "ray_2_workers",
            ratios["ray_2_workers_vs_in_process"],
        ],
        [
            "normflows Glow, in-process loop",
            in_process,
            "normflows",
            "normflows_in_process",
            1 / ratios["flowray_vs_normflows"],
        ],
    ]
    per_repeat = "; ".join(
        f"{key}: " + ", ".join(f"{v:,.0f}" for v in values)
        for key, values in report["samples"].items()
    )
    targets = report["targets"]

    def verdict(name: str, value: float) -> str:
        target = targets[name]
        met = "met" if target["met"] else "missed"
        return f"{value:.2f} (target >= {target['at_least']}: {met})"

    stopped = report["stopped_early"]
    return Table(
        ["run", "threads", "params", "train images/s", "vs flowray in-process"],
        [[run, thr, params[model], rates[key], ratio] for run, thr, model, key, ratio in rows],
        [
            f"Global batch {settings['global_batch']} (split over the Ray workers), "
            f"{settings['seconds_per_run']:g} s of training per run, median of per-window rates "
            f"(first window left out), median over {settings['repeats']} repeat(s); the last "
            f"column is the median of per-repeat ratios; {settings['train_images']:,} training "
            "images.",
            f"Per repeat, images/s: {per_repeat}.",
            f"Ray overhead (2 workers / in-process): "
            f"{verdict('ray_overhead', ratios['ray_2_workers_vs_in_process'])}; flowray / "
            f"normflows: {verdict('flowray_vs_normflows', ratios['flowray_vs_normflows'])}.",
            *(
                [f"Stopped early (images/s measured until then): {'; '.join(stopped)}."]
                if stopped
                else []
            ),
        ],
    )
