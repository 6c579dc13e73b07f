"""Training throughput: flowray's model through Ray Train (1 and 2 workers) against a plain
in-process loop of the same model, and against normflows' Glow at a matched parameter count.

All runs share the global batch (split evenly over the Ray workers). Per repeat: flowray against
normflows in-process (`race`, steps alternating, every core, images in memory), then the
production job (`pipeline.train.driver.train`: Ray Data, DDP for 2 workers, MLflow) with 1 worker
on all cores and 2 workers on 1 core each, each for `seconds`; its logged per-window images/s,
the first window (startup) left out. A run that the non-finite guard stops keeps the windows it
logged, and the report says why it stopped. A ratio is the median of per-repeat ratios (a ratio
of medians would pair figures measured under different loads).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.bench import harness
from pipeline.bench.harness import Result, Run, Table
from pipeline.bench.quality import race
from pipeline.train.config import TrainConfig

TARGETS = {  # name: (the ratio, its least value)
    "ray_overhead": ("ray_2_workers_vs_in_process", 0.9),
    "flowray_vs_normflows": ("flowray_vs_normflows", 1.3),
}
RAY_RUNS = {"ray_1_worker": 1, "ray_2_workers": 2}  # run kind: workers


@dataclass(frozen=True)
class Settings:
    preset: str = "fashion-mnist"  # the model, global batch (per-worker x workers), optimizer
    config_overrides: tuple[str, ...] = ()  # `key=value` changes to the preset
    seconds: float = 60.0  # of training per run (Ray runs: max_minutes; startup on top)
    repeats: int = 3  # runs of each kind; medians reported
    train_images: int | None = None  # the first N (None: all)
    max_steps: int | None = None  # also stop each run after this many steps
    log_every: int = 25  # steps per logged images/s window in the Ray runs


SMOKE = {
    "config_overrides": ["init_images=64", "eval_batch_size=64"],
    "seconds": 2.0,
    "repeats": 1,
    "train_images": 512,
    "max_steps": 3,
    "log_every": 1,
}


def _thread_probe(cpus: float) -> int:
    """torch threads in a fresh Ray worker holding `cpus` CPUs, as a Train worker is (max_calls=1:
    a reused worker keeps the threads of its first task)."""
    import ray

    @ray.remote(max_calls=1)
    def threads() -> int:
        import torch

        return torch.get_num_threads()

    return int(ray.get(threads.options(num_cpus=cpus).remote()))


def _ray_run(
    config: TrainConfig, workdir: Path, name: str, workers: int, settings: Settings
) -> tuple[float, str]:
    """One `train` run with `workers` workers sharing the global batch and the cores: its images/s
    and why it stopped early ("" if it did not)."""
    from mlflow.tracking import MlflowClient

    from pipeline.train.driver import TrainingStopped, train

    cores = os.cpu_count() or 1
    run_config = replace(
        config,
        batch_size=harness.global_batch(config) // workers,
        max_steps=settings.max_steps or 1_000_000,
        max_minutes=settings.seconds / 60,
        eval_every=1_000_000,
        checkpoint_every=1_000_000,
        log_every=settings.log_every,
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
    client = MlflowClient(run_config.mlflow.tracking_uri)
    history = client.get_metric_history(run_id, "images_per_second")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)]
    if not rates:
        raise RuntimeError(f"{name} logged no images/s window before it stopped: {stopped}")
    return harness.median(rates[1:] if len(rates) > 1 else rates), stopped


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
    config = harness.preset_config(settings.preset, settings.config_overrides)
    cores, batch = os.cpu_count() or 1, harness.global_batch(config)
    data, limit = str(run.workdir / f"data-{settings.train_images or 'all'}"), settings.train_images
    train = harness.prepared_fashion_mnist(data, limit, split="train", shard_samples=5000)
    test = harness.prepared_fashion_mnist(data, limit, shard_samples=5000)
    config = replace(
        config,
        data=replace(config.data, train=train, validation=test),
        init_images=min(config.init_images, limit or config.init_images),
    )
    _, images = harness.fashion_mnist("train", limit)
    runs = ("flowray_in_process", "normflows_in_process", *RAY_RUNS)
    samples: dict[str, list[float]] = {key: [] for key in runs}
    stopped: list[str] = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with harness.torch_threads(cores), harness.local_ray(cores + 2, dashboard=True):
        threads = {
            "ray_1_worker": f"1 worker x {_thread_probe(cores)} threads",
            "ray_2_workers": f"2 workers x {_thread_probe(cores // 2)} threads",
        }
        for repeat in range(settings.repeats):
            step = f"repeat {repeat + 1}/{settings.repeats}"
            run.log(f"{step}: in-process flowray and normflows")
            budget = {"seconds": settings.seconds, "max_steps": settings.max_steps}
            racers = race(config, images, **budget, window_steps=10)
            harness.run_race(racers)
            for name, racer in racers.items():
                samples[f"{name}_in_process"].append(racer.images_per_second)
            for key, workers in RAY_RUNS.items():
                run.log(f"{step}: Ray Train, {workers} worker(s)")
                name = f"bench-{stamp}-{key}-{repeat}"
                rate, reason = _ray_run(config, run.workdir, name, workers, settings)
                samples[key].append(rate)
                if reason:
                    run.log(f"{step}, {key}: {reason}")
                    stopped.append(f"{key}, repeat {repeat + 1}: {reason}")

    def ratio(top: str, bottom: str) -> float:
        return harness.median([a / b for a, b in zip(samples[top], samples[bottom])])

    ratios = {
        "ray_2_workers_vs_in_process": ratio("ray_2_workers", "flowray_in_process"),
        "ray_1_worker_vs_in_process": ratio("ray_1_worker", "flowray_in_process"),
        "flowray_vs_normflows": ratio("flowray_in_process", "normflows_in_process"),
    }
    figures: dict[str, Any] = {
        "settings": {
            "global_batch": batch,
            "seconds_per_run": settings.seconds,
            "repeats": settings.repeats,
            "train_images": len(images),
            "log_every": settings.log_every,
            "threads": {"in_process": cores, **threads},
            "params": {name: racer.figures()["params"] for name, racer in racers.items()},
        },
        "samples": samples,
        "stopped_early": stopped,
        "images_per_second": {key: harness.median(values) for key, values in samples.items()},
        "ratios": ratios,
        "targets": {
            name: {"at_least": least, "met": bool(ratios[ratio] >= least)}
            for name, (ratio, least) in TARGETS.items()
        },
    }
    return Result(figures, [_table(figures)])


def _table(report: dict[str, Any]) -> Table:
    settings, rates, ratios = report["settings"], report["images_per_second"], report["ratios"]
    threads, params, targets = settings["threads"], settings["params"], report["targets"]
    one, two = threads["ray_1_worker"], threads["ray_2_workers"]
    local = f"1 process x {threads['in_process']} threads"
    vs_one, vs_two = ratios["ray_1_worker_vs_in_process"], ratios["ray_2_workers_vs_in_process"]
    vs_glow = 1 / ratios["flowray_vs_normflows"]
    rows = [  # run, threads, model, images/s key, ratio to flowray in-process
        ["flowray, in-process loop", local, "flowray", "flowray_in_process", 1.0],
        ["flowray, Ray Train 1 worker", one, "flowray", "ray_1_worker", vs_one],
        ["flowray, Ray Train 2 workers (DDP)", two, "flowray", "ray_2_workers", vs_two],
        ["normflows Glow, in-process loop", local, "normflows", "normflows_in_process", vs_glow],
    ]
    per_repeat = "; ".join(
        f"{key}: " + ", ".join(f"{v:,.0f}" for v in values)
        for key, values in report["samples"].items()
    )

    def verdict(name: str) -> str:
        target, met = targets[name], "met" if targets[name]["met"] else "missed"
        return f"{ratios[TARGETS[name][0]]:.2f} (target >= {target['at_least']}: {met})"

    stopped = report["stopped_early"]
    table = Table(
        ["run", "threads", "params", "train images/s", "vs flowray in-process"],
        [[run, thr, params[model], rates[key], ratio] for run, thr, model, key, ratio in rows],
        [
            f"Global batch {settings['global_batch']} (split over the Ray workers), "
            f"{settings['seconds_per_run']:g} s of training per run, median of per-window rates "
            f"(first window left out), median over {settings['repeats']} repeat(s); the last "
            f"column is the median of per-repeat ratios; {settings['train_images']:,} training "
            "images.",
            f"Per repeat, images/s: {per_repeat}.",
            f"Ray overhead (2 workers / in-process): {verdict('ray_overhead')}; flowray / "
            f"normflows: {verdict('flowray_vs_normflows')}.",
        ],
    )
    if stopped:
        table.notes.append(f"Stopped early (images/s measured until then): {'; '.join(stopped)}.")
    return table
