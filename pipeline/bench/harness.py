"""What every benchmark suite shares: timing and medians, torch threads, the preset model,
Fashion-MNIST (in memory and as shards), the in-process training race, a local Ray, S3 on
loopback, the memory of a process tree, and one table type rendered to Markdown and JSON.

Numbers from a shared machine mean something only side by side: suites report medians and ratios,
and every report carries `machine()`. Ray, moto, boto3 and psutil are imported where used, so the
GPU and ablation suites run where only torch and the light dependencies are installed.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from flowmodel import Flow, FlowConfig, build_flow
from flowmodel.typed import from_dict, to_dict
from pipeline.config import apply_overrides, load_config
from pipeline.storage import StorageConfig
from pipeline.train.config import TrainConfig
from pipeline.train.ema import EMA
from pipeline.train.step import (
    budget_progress,
    evaluate_bits_per_dim,
    make_optimizer,
    set_learning_rate,
    train_step,
)

T = TypeVar("T")
BENCH_BUCKET = "flowray-bench"
# moto accepts any credentials; these stand in for them while a suite runs, so that no real
# credentials are sent even to loopback (moto refuses anonymous reads).
FAKE_S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret"}


# ----------------------------------------------------------------------------- figures


def median(values: Sequence[float]) -> float:
    """The median of the finite values; NaN when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def medians(repeats: Sequence[dict[str, float]]) -> dict[str, float]:
    """Each key's `median` over the repeats' figures (keys in the first repeat's order)."""
    return {key: median([figures[key] for figures in repeats]) for key in repeats[0]}


def suite_settings(settings: type[T], changes: dict[str, Any], overrides: Sequence[str]) -> T:
    """A suite's typed settings: its defaults, then `changes` (its SMOKE sizes), then the
    `key=value` overrides."""
    data = {**to_dict(settings()), **changes}
    return from_dict(settings, apply_overrides(data, list(overrides)))


def timed(work: Callable[[], T], device: torch.device | None = None) -> tuple[float, T]:
    """(seconds, result) of `work()`; on a CUDA device its queue is drained before and after."""
    drain = torch.cuda.synchronize if device is not None and device.type == "cuda" else None
    if drain:
        drain()
    started = time.perf_counter()
    result = work()
    if drain:
        drain()
    return time.perf_counter() - started, result


@contextmanager
def torch_threads(count: int | None) -> Iterator[int]:
    """torch's intra-op threads set to `count` (None: one per core) until the block ends."""
    before = torch.get_num_threads()
    count = count or os.cpu_count() or 1
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(before)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def _cpu_model() -> str:
    # platform.processor() is "" or "x86_64" on Linux: the model name is in /proc/cpuinfo.
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return importlib.import_module(package).__version__
    except ImportError:
        return None


def machine() -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ray": _version("ray"),
        "normflows": _version("normflows"),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# ----------------------------------------------------------------------------- tables


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


@dataclass
class Table:
    """A table of figures: floats get three decimals below 100 and none above, integers a
    thousands separator, strings are shown as they are; `notes` follow it as paragraphs."""

    headers: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    title: str = ""

    def markdown(self) -> str:
        lines = [self.title, ""] if self.title else []
        if self.headers:
            lines += ["| " + " | ".join(self.headers) + " |", "|" + "---|" * len(self.headers)]
            lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in self.rows]
        notes = [text for note in self.notes for text in ("", note)]
        return "\n".join(lines + notes if lines else notes[1:])

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, **asdict(self)}  # the title first


@dataclass(frozen=True)
class Run:
    """`workdir` (which exists) holds what a suite keeps between runs, `output` the reports."""

    workdir: Path
    output: Path
    log: Callable[[str], None] = print


@dataclass
class Result:
    """What a suite's `measure()` returns: the JSON report's keys and the tables."""

    figures: dict[str, Any]
    tables: list[Table]

    def markdown(self) -> str:
        return "\n\n".join(table.markdown() for table in self.tables)

    def report(self) -> dict[str, Any]:
        tables = [table.to_dict() for table in self.tables]
        return {**self.figures, "tables": tables, "markdown": self.markdown()}


# ----------------------------------------------------------------------------- model and data


def preset_config(preset: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """A training preset (name or YAML) with `key=value` overrides, as `flowray train` loads it."""
    return load_config(TrainConfig, preset, list(overrides))


def fashion_mnist(split: str, limit: int | None = None) -> tuple[list[str], Tensor]:
    """Keys and uint8 images [N, 1, 28, 28] of a Fashion-MNIST split (`IdxSource`). The keys are
    those `prepare` writes, so keyed dequantization noise here equals the scoring job's."""
    from pipeline.data.shards import shard_key
    from pipeline.data.sources import IdxSource, default_idx_dir

    source = IdxSource(default_idx_dir())
    count = source.splits()[split] if limit is None else min(limit, source.splits()[split])
    images = np.stack([item.image for item in source.read(split, range(count))])  # (N, C, H, W)
    return [shard_key(split, index) for index in range(count)], torch.from_numpy(images)


def preset_flow(model: FlowConfig, init_images: Tensor, seed: int = 0) -> Flow:
    """The flow of `model`, seeded and ActNorm-initialised on `init_images`, as training builds it."""
    torch.manual_seed(seed)
    flow = build_flow(model)
    flow.initialize(init_images, generator=torch.Generator().manual_seed(seed))
    return flow


def saved_preset_model(folder: Path, model: FlowConfig | str) -> str:
    """`preset_flow` of `model` (or a preset's) on 512 test images, saved as a model directory."""
    from pipeline.model.artifact import save_flow

    model = preset_config(model).model if isinstance(model, str) else model
    _, images = fashion_mnist("test", 512)
    return str(save_flow(preset_flow(model, images).eval(), folder / "model"))


def prepared_fashion_mnist(
    out: str,
    images: int | None = None,
    *,
    split: str = "test",
    shard_samples: int = 500,
    workers: int = 0,
) -> str:
    """The first `images` of a Fashion-MNIST split as shards under the local folder `out`; the
    split's URL. Past the split's size, its images repeated with unique keys (through `NpySource`,
    whose one split is "train"). A finished split is found again, not rewritten."""
    from pipeline.data.shards import ManifestError, load_manifest, prepare
    from pipeline.data.sources import NpySource, open_source

    source = open_source("idx:")
    if images is None or images <= source.splits()[split]:
        prepare(source, out, splits=[split], limit=images, shard_samples=shard_samples)
        return f"{out}/{split}"
    folder = Path(out)
    try:
        if load_manifest(str(folder / "train")).count == images:
            return str(folder / "train")
    except ManifestError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    npy = folder / "images.npy"
    _, base = fashion_mnist(split)
    np.save(npy, np.resize(base.numpy(), (images, *base.shape[1:])))  # repeats the base images
    prepare(NpySource(str(npy)), out, shard_samples=shard_samples, workers=workers)
    npy.unlink()  # the shards hold the images now
    return str(folder / "train")


# ----------------------------------------------------------------------------- training races


def global_batch(config: TrainConfig) -> int:
    """Per-worker batch x workers: the images one optimizer step of the Ray Train job sees."""
    return config.batch_size * max(1, config.scaling.num_workers)


def batches(images: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless shuffled batches, reshuffled every epoch; the same order for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield images[order[start : start + batch_size]]


class Racer:
    """One model in an in-process training race, trained as the Ray Train job trains: `step`
    (`train_step` or its like for another library) at the global batch, the preset's optimizer,
    schedule and clipping, an EMA after every step not skipped, seeded noise and batch order.
    Only step time counts towards the budget; the rate of each `window_steps` window is kept,
    so that start-up and one-off stalls do not move the median."""

    def __init__(
        self,
        model: nn.Module,
        images: Tensor,
        config: TrainConfig,
        *,
        seconds: float,
        max_steps: int | None,
        step: Callable[..., Any] = train_step,
        evaluate: Callable[..., tuple[float, int]] = evaluate_bits_per_dim,
        window_steps: int = 20,
    ) -> None:
        self.model, self.config, self.step, self.evaluate = model, config, step, evaluate
        self.seconds, self.max_steps, self.window_steps = seconds, max_steps, window_steps
        self.batch_size = global_batch(config)
        self.optimizer = make_optimizer(model.parameters(), config.optim)
        self.ema = EMA(model, config.optim.ema_decay)
        self.noise = torch.Generator().manual_seed(config.seed)
        self.batches = batches(images, self.batch_size, config.seed)
        self.steps = self.skipped = 0
        self.elapsed = self.window = 0.0
        self.loss = math.nan
        self.rates: list[float] = []

    @property
    def progress(self) -> float:
        """The budget spent, in [0, 1], as the Ray loop counts it."""
        return budget_progress(self.steps, self.max_steps, self.elapsed, self.seconds / 60)

    @property
    def done(self) -> bool:
        steps_done = self.max_steps is not None and self.steps >= self.max_steps
        return self.elapsed >= self.seconds or steps_done

    def advance(self) -> None:
        """One step on the next batch, timed alone (drawing the batch is not step time)."""
        batch = next(self.batches)
        started = time.perf_counter()
        optim = self.config.optim
        set_learning_rate(self.optimizer, optim, self.steps, self.progress)
        clip, noise = optim.max_grad_norm, self.noise
        metrics = self.step(self.model, batch, self.optimizer, max_grad_norm=clip, generator=noise)
        if metrics.skipped:
            self.skipped += 1
        else:
            self.ema.update(self.model)
        self.loss = metrics.bits_per_dim
        took = time.perf_counter() - started
        self.steps += 1
        self.elapsed += took
        self.window += took
        if self.steps % self.window_steps == 0:
            self.rates.append(self.window_steps * self.batch_size / self.window)
            self.window = 0.0

    @property
    def images_per_second(self) -> float:
        """The median window rate without the first (warm-up) window, when there are others."""
        rates = self.rates or [self.steps * self.batch_size / max(self.elapsed, 1e-9)]
        return median(rates[1:] if len(rates) > 1 else rates)

    def figures(self) -> dict[str, Any]:
        return {
            "params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "steps": self.steps,
            "train_seconds": self.elapsed,
            "images_seen": self.steps * self.batch_size,
            "images_per_second": self.images_per_second,
            "last_train_bits_per_dim": self.loss,
            "skipped_steps": self.skipped,
        }

    def tested(self, keys: list[str], images: Tensor) -> dict[str, Any]:
        """`figures()` and the test bits/dim of the EMA weights on (keys, images), keyed noise."""
        size, seed = self.config.eval_batch_size, self.config.eval_seed
        chunks = [(keys[i : i + size], images[i : i + size]) for i in range(0, len(keys), size)]
        seconds, (bits, count) = timed(lambda: self.evaluate(self.ema.model, chunks, seed))
        tested = {"test_bits_per_dim": bits, "test_images": count, "eval_seconds": seconds}
        return {**self.figures(), **tested}


def run_race(racers: dict[str, Racer], log: Callable[[str], None] | None = None) -> None:
    """One step of each racer in turn until each has spent its budget: the load of a shared
    machine drifts, and alternating steps gives every model the same conditions."""
    while not all(racer.done for racer in racers.values()):
        for name, racer in racers.items():
            if racer.done:
                continue
            racer.advance()
            if log is not None and racer.steps % 500 == 0:
                log(
                    f"{name}: step {racer.steps}, {racer.elapsed:.0f} s, "
                    f"train {racer.loss:.3f} bits/dim"
                )


# ----------------------------------------------------------------------------- Ray and S3


def score_job(
    model: str, split: str, output: Path, workdir: Path, interval: float = 0.5, **options: Any
) -> tuple[float, Any, RssSampler]:
    """`flowray score` of `split` into `output` (more ScoreConfig `options`, no MLflow logging):
    its wall seconds, its ScoreResult and the process tree's memory, sampled every `interval` s."""
    from pipeline.batch.scoring.job import ScoreConfig, score

    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    options |= {"model": model, "input": split, "output": str(output)}
    config = ScoreConfig(tracking_uri=tracking, log_to_mlflow=False, **options)
    with RssSampler(interval) as memory:
        seconds, result = timed(lambda: score(config))
    return seconds, result, memory


@contextmanager
def local_ray(
    cpus: int | None = None, *, dashboard: bool = False, worker_logs: bool = True
) -> Iterator[bool]:
    """A local Ray until the block ends (never RAY_ADDRESS's cluster); one already running is
    used as it is. Yields whether it started one. `cpus` defaults to `local_cpus()`, as `flowray
    score` starts Ray; Ray Train's placement-group cleaner needs the `dashboard`; `worker_logs`
    is off for Serve (a line per request)."""
    import ray
    from ray.data import DataContext

    from pipeline.batch.scoring.actors import local_cpus

    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local",
            num_cpus=cpus or local_cpus(),
            include_dashboard=dashboard,
            logging_level=logging.WARNING,
            log_to_driver=worker_logs,
        )
    DataContext.get_current().enable_progress_bars = False
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


@contextmanager
def loopback_s3() -> Iterator[StorageConfig]:
    """moto's S3 server on 127.0.0.1 with BENCH_BUCKET, and FAKE_S3_CREDENTIALS in the
    environment (a Ray started inside the block gives them to its workers); both undone after."""
    import boto3
    from moto.server import ThreadedMotoServer

    saved = {
        name: os.environ.pop(name, None) for name in [*FAKE_S3_CREDENTIALS, "AWS_SESSION_TOKEN"]
    }
    os.environ.update(FAKE_S3_CREDENTIALS)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=BENCH_BUCKET)
        yield StorageConfig(endpoint_url=endpoint, region="us-east-1")
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ----------------------------------------------------------------------------- memory


def process_role(process: Any, root: int) -> str:
    """What a process is: "driver" (`root`), a Ray actor's class or task worker from its title
    ("ray::Scorer.__call__" -> "ray::Scorer"), else its executable's or script's name."""
    import psutil

    if process.pid == root:
        return "driver"
    try:
        title = " ".join(process.cmdline()) or process.name()
    except psutil.Error:
        return "gone"
    if title.startswith("ray::"):
        return title.split()[0].split(".")[0]
    executable = title.split()[0].rsplit("/", 1)[-1]
    if executable.startswith("python"):  # Ray's helper scripts: dashboard, log monitor, agents
        script = next((a for a in title.split()[1:] if a.endswith(".py")), executable)
        return script.rsplit("/", 1)[-1]
    return executable


class RssSampler:
    """Peak memory of this process and all its descendants (a local Ray's processes), sampled
    every `interval` seconds while the block runs: summed RSS (shared pages counted in each
    process), summed PSS (shared pages split, so Ray's object store counts once) and the peak
    sample's PSS by `process_role`. Linux only; elsewhere NaN."""

    def __init__(self, interval: float = 0.5, root: int | None = None) -> None:
        self.interval = interval
        self.root = root or os.getpid()
        self.peak_rss_mb = self.peak_pss_mb = math.nan
        self.processes = 0
        self.peak_pss_by_role_mb: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> None:
        import psutil

        if not psutil.LINUX:  # PSS is Linux-only; RSS alone would not be comparable
            return
        try:
            process = psutil.Process(self.root)
            processes = [process, *process.children(recursive=True)]
        except psutil.Error:
            processes = []
        rss = pss = 0
        roles: dict[str, float] = {}
        for process in processes:
            try:
                info = process.memory_full_info()  # /proc/<pid>/smaps_rollup on Linux
            except psutil.Error:
                continue
            rss, pss = rss + info.rss // 1024, pss + getattr(info, "pss", 0) // 1024
            role = process_role(process, self.root)
            roles[role] = roles.get(role, 0.0) + getattr(info, "pss", 0) / 2**20
        self.processes = max(self.processes, len(processes))
        self.peak_rss_mb = max(rss / 1024, 0 if math.isnan(self.peak_rss_mb) else self.peak_rss_mb)
        if math.isnan(self.peak_pss_mb) or pss / 1024 >= self.peak_pss_mb:
            self.peak_pss_mb = pss / 1024
            self.peak_pss_by_role_mb = dict(sorted(roles.items(), key=lambda kv: -kv[1]))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
