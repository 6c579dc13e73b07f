"""Scoring: Ray Data scoring (`flowray score`) against the same work in one process, at N and
growth x N images, medians over repeats:

- in-process, the same work (the baseline the Ray Data figures are divided by): a reader thread
  runs the production reader (`iter_input`: read, check, decode) and hands batches to the main
  thread, which scores them (`score_images`, every core) and writes Parquet per shard through the
  job's `ShardCollector`. The thread overlaps reading (holding the GIL) with the forward pass
  (which releases it): the best simple way to use every core in one process.
- raw forward: `predict_frame` alone on images decoded in memory: the ceiling, apart.
- Ray Data scoring (`pipeline.batch.scoring.job.score`), input on local disk and on S3 (moto):
  images/s from the start of execution, actor start-up included (small inputs understate it).
  The first job on a fresh Ray also starts its workers: it runs before the timed ones, apart.
- start-up: the intercept of the line through the two local runs' wall times.
- peak memory of the whole job (summed PSS over the process tree) at N and growth x N images:
  flat means inputs stream.

The model is the preset's at its initialisation (throughput does not depend on training).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench import harness
from pipeline.bench.harness import Result, Run, Table
from pipeline.config import load_config
from pipeline.storage import StorageConfig
from pipeline.train.config import TrainConfig


@dataclass(frozen=True)
class Settings:
    preset: str = "fashion-mnist"  # the training preset whose model is scored
    model: str | None = None  # a local model directory instead (None: the preset's, untrained)
    images: int = 1000  # N, per run
    repeats: int = 3  # medians reported
    growth: int = 10  # the memory check also scores growth x N images
    batch_size: int = 256
    actors: int = 0  # scoring actors (0: as many as the CPUs allow)


SMOKE = {"images": 128, "repeats": 1, "growth": 2}


def _raw_forward(flow: Any, split: str, batch_size: int) -> float:
    """Images/s of predict_frame alone over the split's images decoded in memory, all cores."""
    from pipeline.data.reader import iter_input
    from pipeline.model.likelihood import predict_frame

    rows = list(iter_input(split, shape=flow.config.image_shape))
    keys = [row["key"] for row in rows]
    images = np.stack([row["image"] for row in rows])  # (N, C, H, W)
    with harness.torch_threads(None):
        seconds, _ = harness.timed(
            lambda: [
                predict_frame(flow, images[i : i + batch_size], keys[i : i + batch_size], 0, 1)
                for i in range(0, len(keys), batch_size)
            ]
        )
    return len(keys) / seconds


def _batches(split: Any, shape: tuple[int, int, int], size: int) -> Iterator[dict[str, Any]]:
    """The split's rows through the production reader, as column batches of `size` rows."""
    from pipeline.data.reader import iter_input

    rows = iter_input(split, shape=shape)
    while batch := list(itertools.islice(rows, size)):
        columns = {name: [row[name] for row in batch] for name in batch[0]}
        yield {**columns, "image": np.stack(columns["image"])}  # (B, C, H, W)


def _ahead(batches: Iterator[Any], depth: int = 4) -> Iterator[Any]:
    """`batches`, produced by a thread up to `depth` ahead of the consumer."""
    handed: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for batch in batches:
                handed.put(batch)
            handed.put(done)
        except BaseException as err:  # raised in the consumer
            handed.put(err)

    threading.Thread(target=produce, daemon=True).start()
    while (batch := handed.get()) is not done:
        if isinstance(batch, BaseException):
            raise batch
        yield batch


def _same_work(flow: Any, model: str, split: str, batch_size: int, output: Path) -> float:
    """Images/s of the job's work in this process (module docstring)."""
    import pandas as pd

    from pipeline.batch.scoring.config import ScoreConfig
    from pipeline.batch.scoring.output import ShardCollector
    from pipeline.data.inputs import resolve_input
    from pipeline.model.scores import score_images

    config = ScoreConfig(model=model, input=split, output=str(output))  # the job's seed, draws
    plan = resolve_input(split)
    targets = {ref.url: ref.expect.count for ref in plan.shards if ref.expect is not None}

    def work() -> int:
        collector = ShardCollector(str(output), targets, config.storage)
        count = 0
        for batch in _ahead(_batches(plan, flow.config.image_shape, batch_size)):
            keys = [str(key) for key in batch["key"]]
            scores = score_images(flow, batch["image"], keys, config.seed, config.draws)
            passed = ("shard", "label", "orig_width", "orig_height", "shard_rows")
            collector.add(pd.DataFrame({"key": keys, **{n: batch[n] for n in passed}, **scores}))
            count += len(keys)
        collector.close(None)
        return count

    with harness.torch_threads(None):
        seconds, count = harness.timed(work)
    return count / seconds


def _to_s3(local: str, url: str, storage: StorageConfig) -> str:
    """A prepared split copied to `url` (the harness prepares on S3 at most the split's images)."""
    from pipeline.storage import fsspec_filesystem, join_url

    fs, _ = fsspec_filesystem(url, storage)
    for file in sorted(Path(local).iterdir()):
        if file.is_file() and not file.name.startswith((".", "_")):
            fs.put_file(str(file), fsspec_filesystem(join_url(url, file.name), storage)[1])
    return url


def _read_cost(split: str, shape: tuple[int, int, int], rows_per_block: int) -> dict[str, Any]:
    """The read task's cost per image, in a Ray worker: its code (`ray_source` blocks of the
    reader's rows) over `split`, median of 3 runs, then once under cProfile: its top entries."""
    import ray

    @ray.remote(num_cpus=1)
    def read_task() -> dict[str, Any]:
        import cProfile
        import io
        import pstats

        from pipeline.data.inputs import resolve_input
        from pipeline.data.ray_source import TaskPlan, tasks_datasource
        from pipeline.data.reader import iter_input

        plan = resolve_input(split)
        urls = [ref.url for ref in plan.shards]

        def rows(shards: list[str], seed: int | None, shuffle: bool) -> Iterator[dict]:
            return iter_input(plan, shape=shape, shards=shards)

        tasks = TaskPlan("read", urls, [None] * len(urls), 0, rows)
        [task] = tasks_datasource(tasks, False, None, rows_per_block).get_read_tasks(1)

        def run() -> int:
            return sum(block.num_rows for block in task())

        run()  # warm: imports, page cache
        runs = [harness.timed(run) for _ in range(3)]
        profile = cProfile.Profile()
        profile.runcall(run)
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(8)
        top = [line for line in text.getvalue().splitlines() if line.strip()][-9:]
        return {"us_per_image": harness.median([t / n * 1e6 for t, n in runs]), "profile_top": top}

    return ray.get(read_task.remote())


def _score(
    settings: Settings, model: str, split: str, base: Path, s3: StorageConfig, tag: str
) -> dict[str, float]:
    """`flowray score` on `split` into a fresh prefix: images/s, wall time, peak PSS."""
    output = base / "scores" / f"{tag}-{time.monotonic_ns()}"
    options = {"storage": s3, "batch_size": settings.batch_size, "actors": settings.actors}
    seconds, result, memory = harness.score_job(model, split, output, base, 0.25, **options)
    return {"rate": result.images_per_second, "seconds": seconds, "pss": memory.peak_pss_mb}


def measure(settings: Settings, run: Run) -> Result:
    from pipeline.model.artifact import load_flow

    base, n, growth = run.workdir, settings.images, settings.growth
    model_config = load_config(TrainConfig, settings.preset).model
    model = settings.model or harness.saved_preset_model(base, model_config)
    flow = load_flow(model)
    sizes = {"": n, f"_{growth}x": n * growth}
    repeats: list[dict[str, float]] = []
    peaks: dict[str, list[float]] = {"n": [], f"{growth}n": []}
    startups: list[float] = []
    # Stand-in credentials before Ray starts: its workers inherit them.
    with harness.loopback_s3() as s3, harness.local_ray():
        local = {
            tag: harness.prepared_fashion_mnist(f"{base}/data-{size}", size)
            for tag, size in sizes.items()
        }
        remote = {
            tag: _to_s3(local[tag], f"s3://{harness.BENCH_BUCKET}/data-{size}", s3)
            for tag, size in sizes.items()
        }
        first = _score(settings, model, local[""], base, s3, "first")  # starts Ray's workers
        for _ in range(settings.repeats):
            runs = {"raw_forward": _raw_forward(flow, local[""], settings.batch_size)}
            seconds = []
            for tag in sizes:  # side by side: the baseline, then the job on disk and on S3
                output = base / "in-process" / f"{time.monotonic_ns()}"
                same = _same_work(flow, model, local[tag], settings.batch_size, output)
                on_disk = _score(settings, model, local[tag], base, s3, f"local{tag}")
                on_s3 = _score(settings, model, remote[tag], base, s3, f"s3{tag}")
                runs |= {f"in_process{tag}": same, f"score_local{tag}": on_disk["rate"]}
                runs[f"score_s3{tag}"] = on_s3["rate"]
                peaks["n" if not tag else f"{growth}n"].append(on_disk["pss"])
                seconds.append(on_disk["seconds"])
            repeats.append(runs)
            # The intercept of the line through the two runs' (images, seconds): the fixed cost.
            per_image = (seconds[1] - seconds[0]) / (n * growth - n)
            startups.append(seconds[0] - n * per_image)
        read = _read_cost(local[""], flow.config.image_shape, settings.batch_size)
    results = harness.medians(repeats)
    report: dict[str, Any] = {
        "images": n,
        "repeats": settings.repeats,
        "growth": growth,
        "results": results,
        **{
            f"ratio_{where}{tag}": results[f"score_{where}{tag}"] / results[f"in_process{tag}"]
            for tag in sizes
            for where in ("local", "s3")
        },
        **{
            f"s3_vs_local{tag}": results[f"score_s3{tag}"] / results[f"score_local{tag}"]
            for tag in sizes
        },
        "startup_seconds": harness.median(startups),
        "first_job_seconds": first["seconds"],
        "memory_mb": {name: harness.median(values) for name, values in peaks.items()},
        "read_task": read,
    }
    return Result(report, [_table(report)])


def _table(report: dict[str, Any]) -> Table:
    results, memory, growth, n = (report[k] for k in ("results", "memory_mb", "growth", "images"))
    rows = [["raw forward (decoded in memory, all cores)", n, results["raw_forward"], "-", "-"]]
    for tag, size, peak in (
        ("", n, memory["n"]),
        (f"_{growth}x", n * growth, memory[f"{growth}n"]),
    ):
        local, s3 = (f"score_{where}{tag}" for where in ("local", "s3"))
        rows += [
            ["in-process, the same work (all cores)", size, results[f"in_process{tag}"], 1.0, "-"],
            ["Ray Data score, local disk", size, results[local], report[f"ratio_local{tag}"], peak],
            ["Ray Data score, S3 (moto)", size, results[s3], report[f"ratio_s3{tag}"], "-"],
        ]
    profile = "\n".join(f"    {line}" for line in report["read_task"]["profile_top"])
    return Table(
        ["measurement", "images", "images/s (median)", "vs in-process", "peak PSS MB"],
        rows,
        [
            f"Median of {report['repeats']} runs; Ray Data figures include actor start-up. "
            f"Start-up (intercept of the two local runs' wall times): "
            f"{report['startup_seconds']:.1f} s; the first job on the fresh Ray, untimed above, "
            f"took {report['first_job_seconds']:.1f} s for {n:,} images. S3 / local disk: "
            f"{report['s3_vs_local']:.2f} at {n:,} images, "
            f"{report[f's3_vs_local_{growth}x']:.2f} at {n * growth:,}.",
            f"Read task (its code in a Ray worker, {n:,} images, median of 3): "
            f"{report['read_task']['us_per_image']:.0f} us per image; cProfile's top entries "
            f"by own time:\n\n{profile}",
        ],
    )
