"""Serving: `flowray serve`'s deployment on loopback at 1, 8 and 64 concurrent clients.

Each request is one Fashion-MNIST test image as PNG bytes POSTed to <url>/score over keep-alive
HTTP on 127.0.0.1; the clients are asyncio tasks in this process, so on a small machine they share
its cores with the server. The ceiling: the same scorer called in this process on decoded images,
without HTTP, Serve or PNG decoding. The model is the preset's at its initialisation, served from
a local directory (no registry, no reloading).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.bench import harness
from pipeline.bench.harness import Result, Run, Table


@dataclass(frozen=True)
class Settings:
    preset: str = "fashion-mnist"  # the training preset whose model is served
    levels: tuple[int, ...] = (1, 8, 64)  # concurrent clients, one run each
    requests: int = 1000  # most requests per level
    seconds: float = 60.0  # most seconds per level
    images: int = 256  # distinct test images sent (and scored for the ceiling)
    max_batch_size: int = 32  # ServeConfig.max_batch_size


SMOKE = {"requests": 48, "seconds": 10.0, "images": 64}


def measure(settings: Settings, run: Run) -> Result:
    from pipeline.data.images import encode_png
    from pipeline.serve.config import ServeConfig
    from pipeline.serve.runner import start, stop

    model = harness.saved_preset_model(run.workdir, settings.preset)
    decoded = harness.fashion_mnist("test", settings.images)[1].numpy()
    pngs = [encode_png(image) for image in decoded]
    config = ServeConfig(
        model=model,
        port=harness.free_port(),
        app_name="flowray-bench",
        reload_interval_s=0,
        max_batch_size=settings.max_batch_size,
        cpus_per_replica=1.0,
    )
    with harness.local_ray(worker_logs=False):
        info = start(config)
        try:
            rows = [
                asyncio.run(_level(info.url, pngs, clients, settings.requests, settings.seconds))
                for clients in settings.levels
            ]
        finally:
            stop(config, shutdown=True)
    ceiling = _ceiling(model, decoded, settings.max_batch_size)
    columns = {  # header: key
        "clients": "clients",
        "requests": "requests",
        "requests/s": "requests_per_second",
        "p50 ms": "p50_ms",
        "p95 ms": "p95_ms",
        "images per forward pass": "mean_batch",
        "errors": "errors",
    }
    table = Table(
        list(columns),
        [[row[key] for key in columns.values()] for row in rows],
        [
            f"Each level: at most {settings.requests:,} requests or {settings.seconds:g} s; "
            f"max_batch_size {settings.max_batch_size}. In-process scorer without HTTP (the "
            f"ceiling): {ceiling:,.0f} images/s."
        ],
    )
    return Result({"levels": rows, "ceiling_images_per_second": ceiling}, [table])


async def _level(
    url: str, pngs: list[bytes], clients: int, requests: int, seconds: float
) -> dict[str, Any]:
    """`clients` concurrent clients POSTing PNGs until `requests` or `seconds`, after a warm-up of
    one request per client."""
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
        "p50_ms": 1000 * harness.median(latencies),
        "p95_ms": 1000 * float(np.percentile(latencies, 95)) if latencies else float("nan"),
        "mean_batch": float(np.mean(batches)) if batches else float("nan"),
    }


async def _drive(
    session: Any, url: str, pngs: list[bytes], clients: int, requests: int, seconds: float
) -> dict[str, Any]:
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


def _ceiling(model_dir: str, decoded: np.ndarray, batch: int) -> float:
    from pipeline.serve.model import load_served_model
    from pipeline.serve.requests import ScoreItem

    model = load_served_model(model_dir, seed=0, draws=1)
    items = [ScoreItem(image, str(i)) for i, image in enumerate(decoded)]
    model.score(items[:batch])  # warm-up
    seconds, scored = harness.timed(
        lambda: sum(len(model.score(items[i : i + batch])) for i in range(0, len(items), batch))
    )
    return scored / seconds
