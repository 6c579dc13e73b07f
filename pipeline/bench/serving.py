"""Serving benchmark: `flowray serve`'s deployment on loopback at 1, 8 and 64 concurrent clients.

    python -m jobs.bench --suite serving                   # 1000 requests or 30 s per level
    python -m jobs.bench --suite serving --smoke           # seconds

Figures, as a Markdown table and as `run(...)`'s dict (for `flowray bench`):
- per level of concurrency: requests/s, p50 and p95 latency, the mean number of images that
  shared a forward pass (@serve.batch), and errors. Each request is one Fashion-MNIST test image
  as PNG bytes, POSTed to <url>/score over keep-alive HTTP on 127.0.0.1; the clients run as
  asyncio tasks in this process, so on a small machine they share its cores with the server.
- the ceiling: the same scorer called in this process on batches of `max_batch_size` decoded
  images, without HTTP, Serve or PNG decoding (images/s).

Bounded: each level stops after `requests` requests or `seconds`, whichever comes first, and
sends nothing anywhere but 127.0.0.1. The model is the preset's FlowConfig at its data-dependent
initialisation (throughput does not depend on training), served from a local directory (no
registry, no reloading).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.bench.common import fashion_mnist, machine, markdown_table

__all__ = ["run"]

LEVELS = (1, 8, 64)


def run(
    model_config: Any = None,
    levels: tuple[int, ...] = LEVELS,
    requests: int = 1000,
    seconds: float = 30.0,
    images: int = 256,
    max_batch_size: int = 32,
) -> dict[str, Any]:
    """Serve a fresh flow on loopback and measure each level of concurrency (module docstring)."""
    import ray

    from pipeline.serve.config import ServeConfig
    from pipeline.serve.runner import start, stop

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, pngs, decoded = _model_and_images(model_config, Path(tmp), images)
        config = ServeConfig(
            model=str(model_dir),
            port=_free_port(),
            app_name="flowray-bench",
            reload_interval_s=0,
            max_batch_size=max_batch_size,
            cpus_per_replica=1.0,
        )
        info = start(config)
        try:
            rows = [
                asyncio.run(_level(info.url, pngs, clients, requests, seconds))
                for clients in levels
            ]
        finally:
            stop(config, shutdown=True)
            if started_ray:
                ray.shutdown()
        ceiling = _ceiling(model_dir, decoded, max_batch_size)
    return _report(rows, ceiling, requests, seconds, max_batch_size)


def _model_and_images(
    model_config: Any, folder: Path, count: int
) -> tuple[Path, list[bytes], np.ndarray]:
    from flowmodel import FlowConfig, build_flow
    from pipeline.data.images import encode_png
    from pipeline.model.artifact import save_flow

    _, images = fashion_mnist("test", count)
    flow = build_flow(model_config or FlowConfig())
    flow.initialize(images[: min(256, count)], generator=torch.Generator().manual_seed(0))
    model_dir = save_flow(flow.eval(), folder / "model")
    decoded = images.numpy()
    return model_dir, [encode_png(image) for image in decoded], decoded


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def _level(
    url: str, pngs: list[bytes], clients: int, requests: int, seconds: float
) -> dict[str, Any]:
    """`clients` concurrent keep-alive clients POSTing PNGs until `requests` or `seconds`,
    after a warm-up of one request per client (connections opened, replica warm)."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await _drive(session, url, pngs, clients, clients, seconds)  # warm-up
        began = time.perf_counter()
        tally = await _drive(session, url, pngs, clients, requests, seconds)
        elapsed = time.perf_counter() - began
    latencies, batches = tally["latencies"], tally["batches"]
    done = len(latencies)
    return {
        "clients": clients,
        "requests": done,
        "errors": tally["errors"],
        "seconds": elapsed,
        "requests_per_second": done / elapsed if elapsed > 0 else float("nan"),
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p95_ms": 1000 * float(np.percentile(latencies, 95)) if latencies else float("nan"),
        "mean_batch": float(np.mean(batches)) if batches else float("nan"),
    }


async def _drive(
    session: Any, url: str, pngs: list[bytes], clients: int, requests: int, seconds: float
) -> dict[str, Any]:
    """Send up to `requests` requests from `clients` concurrent clients within `seconds`."""
    tally: dict[str, Any] = {"sent": 0, "errors": 0, "latencies": [], "batches": []}
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        while tally["sent"] < requests and time.perf_counter() < deadline:
            png = pngs[tally["sent"] % len(pngs)]
            tally["sent"] += 1
            began = time.perf_counter()
            async with session.post(
                f"{url}/score", data=png, headers={"Content-Type": "image/png"}
            ) as response:
                body = await response.json()
            if response.status != 200:
                tally["errors"] += 1
                continue
            tally["latencies"].append(time.perf_counter() - began)
            tally["batches"].append(body["predictions"][0]["batch_size"])

    await asyncio.gather(*(client() for _ in range(clients)))
    return tally


def _ceiling(model_dir: Path, decoded: np.ndarray, batch: int) -> float:
    """Images/s of the served scorer in this process, on decoded images, no HTTP: the bound."""
    from pipeline.serve.model import load_served_model
    from pipeline.serve.requests import ScoreItem

    model = load_served_model(str(model_dir), seed=0, draws=1)
    items = [ScoreItem(image, str(i)) for i, image in enumerate(decoded)]
    model.score(items[:batch])  # warm-up
    began, scored = time.perf_counter(), 0
    for start in range(0, len(items), batch):
        scored += len(model.score(items[start : start + batch]))
    return scored / (time.perf_counter() - began)


def _report(
    rows: list[dict[str, Any]], ceiling: float, requests: int, seconds: float, batch: int
) -> dict[str, Any]:
    table = markdown_table(
        [
            "clients",
            "requests",
            "requests/s",
            "p50 ms",
            "p95 ms",
            "images per forward pass",
            "errors",
        ],
        [
            [
                r["clients"],
                r["requests"],
                r["requests_per_second"],
                r["p50_ms"],
                r["p95_ms"],
                r["mean_batch"],
                r["errors"],
            ]
            for r in rows
        ],
    )
    note = (
        f"\n\nEach level: at most {requests:,} requests or {seconds:g} s; max_batch_size {batch}. "
        f"In-process scorer without HTTP (the ceiling): {ceiling:,.0f} images/s."
    )
    return {
        "machine": machine(),
        "levels": rows,
        "ceiling_images_per_second": ceiling,
        "markdown": table + note,
    }
