"""Helpers shared by the benchmark suites: the machine, medians and tables, Fashion-MNIST in
memory, S3 on loopback (moto), memory of a process tree. The in-process training races live in
`pipeline.bench.race`.

Numbers from this machine are only meaningful side by side (it is shared and noisy), so every
suite reports medians and ratios, and every report carries `machine()`: CPU, cores, versions,
threads and the load average when it started.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import statistics
import threading
from collections.abc import Sequence
from contextlib import ExitStack
from types import TracebackType
from typing import Any

import numpy as np
import psutil
import torch
from torch import Tensor

from pipeline.storage import StorageConfig

__all__ = [
    "BENCH_BUCKET",
    "fashion_mnist",
    "FAKE_S3_CREDENTIALS",
    "fake_s3_credentials",
    "finite_positive",
    "machine",
    "markdown_table",
    "median",
    "RssSampler",
    "start_s3",
]


def median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def finite_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _cpu_model() -> str:
    # psutil has no CPU model name, and platform.processor() is "" or "x86_64" on Linux: the
    # model is read from /proc/cpuinfo where it exists.
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the figures were measured on. The load average shows how busy the shared machine was.
    Ray's version is None where Ray is not installed (the ablation suite runs without it)."""
    try:
        import ray

        ray_version: str | None = ray.__version__
    except ImportError:
        ray_version = None
    try:
        from importlib.metadata import version

        normflows_version = version("normflows")
    except Exception:  # not installed: the suites that need it say so themselves
        normflows_version = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ray": ray_version,
        "normflows": normflows_version,
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats get 4 significant decimals, large numbers a separator."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            if not math.isfinite(value):
                return "n/a"
            return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- data


_IDX_PREFIXES = {"train": "train", "test": "t10k"}


def fashion_mnist(
    split: str, limit: int | None = None, folder: str | None = None
) -> tuple[list[str], Tensor]:
    """Keys and uint8 images [N, 1, 28, 28] of a Fashion-MNIST split, from the IDX files
    (`<prefix>-images-idx3-ubyte[.gz]`) in `folder` (default: FASHION_MNIST_DIR, else Debian's).

    Read with gzip and numpy only, not through `pipeline.data.sources` (fsspec): the benchmark
    suites run where only torch, numpy and pandas are installed. Keys are the ones `prepare`
    writes into shards ("test-00000042"), so keyed dequantization noise here equals the scoring
    job's for the same image.
    """
    import gzip
    from pathlib import Path

    from pipeline.data.manifest import shard_key
    from pipeline.data.sources import default_idx_dir

    directory = Path(folder or default_idx_dir())
    stem = f"{_IDX_PREFIXES[split]}-images-idx3-ubyte"
    paths = [directory / f"{stem}.gz", directory / stem]
    path = next((p for p in paths if p.exists()), None)
    if path is None:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} images: expected {paths[0]} or {paths[1]}; set "
            "FASHION_MNIST_DIR to the folder holding the four IDX files"
        )
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if data[:4] != b"\x00\x00\x08\x03":
        raise ValueError(f"{path}: expected IDX magic 00000803 (3-d uint8), found {data[:4].hex()}")
    count, height, width = (int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
    count = count if limit is None else min(limit, count)
    pixels = np.frombuffer(data, np.uint8, count * height * width, offset=16)
    images = pixels.reshape(count, 1, height, width)  # (N, 1, H, W)
    keys = [shard_key(split, index) for index in range(count)]
    return keys, torch.from_numpy(images.copy())


# ----------------------------------------------------------------------------- S3 on loopback

BENCH_BUCKET = "flowray-bench"

# moto accepts any credentials; these stand in for them while the benchmark runs, so no real
# credentials are sent even to loopback. (Unsigned requests would do for writes, but moto then
# refuses anonymous reads of the objects.)
FAKE_S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret"}


def fake_s3_credentials(stack: ExitStack) -> None:
    """Stand-in AWS credentials in the environment until `stack` closes (then the old ones)."""
    saved = {name: os.environ.get(name) for name in [*FAKE_S3_CREDENTIALS, "AWS_SESSION_TOKEN"]}

    def restore() -> None:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    stack.callback(restore)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.update(FAKE_S3_CREDENTIALS)


def start_s3(stack: ExitStack) -> StorageConfig:
    """moto's S3 server on 127.0.0.1 (stopped when `stack` closes) with BENCH_BUCKET created."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    stack.callback(server.stop)
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
        Bucket=BENCH_BUCKET
    )
    return StorageConfig(endpoint_url=endpoint, region="us-east-1")


# ----------------------------------------------------------------------------- memory


def _tree(root: int) -> list[psutil.Process]:
    """`root` and all its descendants alive now; [] when `root` is gone."""
    try:
        process = psutil.Process(root)
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return []


def process_role(process: psutil.Process, root: int) -> str:
    """What a process is, for a memory breakdown: "driver" (`root`), a Ray actor's class or a
    task worker from its process title ("ray::Scorer.__call__" -> "ray::Scorer", "ray::IDLE"),
    else the executable's name ("gcs_server", "raylet", "python3" for Ray's helper scripts)."""
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


def _memory_kb(process: psutil.Process) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB; PSS counts shared pages (Ray's object store) once overall.
    (0, 0) for a process that is gone or not ours to read."""
    try:
        info = process.memory_full_info()  # reads /proc/<pid>/smaps_rollup on Linux
    except psutil.Error:
        return 0, 0
    return info.rss // 1024, getattr(info, "pss", 0) // 1024


class RssSampler:
    """Peak memory of this process and all its descendants (the Ray processes a local
    `ray.init()` starts: GCS, raylet, workers), sampled with psutil every `interval` seconds.

    peak_rss_mb sums each process's RSS (shared pages counted in every process that maps them);
    peak_pss_mb sums PSS (shared pages split between them), the closer measure of what the job uses.
    peak_pss_by_role_mb splits the peak sample's PSS by role (`process_role`: the driver, gcs,
    raylet, each Ray actor class, idle or task workers), so a growth can be traced to its holder.
    Linux only; elsewhere all stay NaN (empty).
    """

    def __init__(self, interval: float = 0.5, root: int | None = None) -> None:
        self.interval = interval
        self.root = root or os.getpid()
        self.peak_rss_mb = math.nan
        self.peak_pss_mb = math.nan
        self.processes = 0
        self.peak_pss_by_role_mb: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> None:
        if not psutil.LINUX:  # PSS is Linux-only; RSS alone would not be comparable
            return
        processes = _tree(self.root)
        rss = pss = 0
        roles: dict[str, float] = {}
        for process in processes:
            r, p = _memory_kb(process)
            rss, pss = rss + r, pss + p
            role = process_role(process, self.root)
            roles[role] = roles.get(role, 0.0) + p / 1024
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

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
