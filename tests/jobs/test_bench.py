"""`flowray bench --smoke`: every suite runs end to end at tiny sizes and writes its JSON and table.

No timing thresholds: the machine is shared. Each suite runs in a subprocess, so that its own local
Ray (and its CPU count) does not meet a Ray another test started in this process.
The quality, io and gpu smokes take about 40 s together on a quiet 2-core machine (the timeouts
are hang guards, generous because the machine is shared); training (two Ray Train jobs with MLflow
registration), scoring and scaling (several local Ray starts) take minutes on 2 cores, so they are
marked slow (`pytest -m slow tests/jobs/test_bench.py`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("normflows", reason="the bench extra (pip install -e '.[bench]')")

REPO = Path(__file__).resolve().parents[2]


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _smoke(suite: str, out: Path, fashion_mnist_dir: Path, timeout: int) -> dict[str, Any]:
    env = {**os.environ, "FASHION_MNIST_DIR": str(fashion_mnist_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "jobs.bench", "--smoke", "--suite", suite, "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"## {suite}" in done.stdout
    assert (out / f"{suite}.md").read_text().startswith(f"## {suite}")
    return json.loads((out / f"{suite}.json").read_text())


def _check_quality(report: dict[str, Any]) -> None:
    for name in ("flowray", "normflows"):
        figures = report["models"][name]
        for key in ("params", "steps", "images_per_second", "test_bits_per_dim"):
            assert _positive(figures[key]), (name, key, figures[key])
    # Matched parameter counts: within 1% of each other.
    assert abs(report["ratios"]["params"] - 1) < 0.01
    assert "| flowray |" in report["markdown"] and "| normflows |" in report["markdown"]
    assert _positive(report["machine"]["cores"])


def _check_io(report: dict[str, Any]) -> None:
    for backend in ("local", "s3"):
        for key in ("write", "read_iter", "read_ray", "mb"):
            assert _positive(report["results"][backend][key]), (backend, key)


def _check_gpu(report: dict[str, Any]) -> None:
    assert report["skipped"]


def _check_training(report: dict[str, Any]) -> None:
    for key in ("flowray_in_process", "normflows_in_process", "ray_1_worker", "ray_2_workers"):
        assert _positive(report["images_per_second"][key]), key
    for key in ("ray_2_workers_vs_in_process", "flowray_vs_normflows"):
        assert _positive(report["ratios"][key]), key
    assert "threads" in report["markdown"]


def _check_scoring(report: dict[str, Any]) -> None:
    for key, value in report["results"].items():
        assert _positive(value), key


def _check_scaling(report: dict[str, Any]) -> None:
    assert [row["images"] for row in report["rows"]] == [256, 512]
    for row in report["rows"]:
        assert row["scored"] == row["images"]
        for key in ("seconds", "images_per_second", "peak_pss_mb", "peak_rss_mb"):
            assert _positive(row[key]), key


CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "quality": _check_quality,
    "io": _check_io,
    "gpu": _check_gpu,
    "training": _check_training,
    "scoring": _check_scoring,
    "scaling": _check_scaling,
}


@pytest.mark.timeout(330)
@pytest.mark.parametrize("suite", ["quality", "io", "gpu"])
def test_smoke_suite_writes_finite_figures(
    suite: str, tmp_path: Path, fashion_mnist_dir: Path
) -> None:
    CHECKS[suite](_smoke(suite, tmp_path, fashion_mnist_dir, timeout=300))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("suite", ["training", "scoring", "scaling"])
def test_slow_smoke_suite_writes_finite_figures(
    suite: str, tmp_path: Path, fashion_mnist_dir: Path
) -> None:
    CHECKS[suite](_smoke(suite, tmp_path, fashion_mnist_dir, timeout=880))


def test_race_contender_warms_up_counts_skips_and_averages_only_good_steps() -> None:
    import torch

    from pipeline.bench.race import make_contender
    from pipeline.train.config import TrainConfig
    from pipeline.train.step import StepMetrics

    config = TrainConfig.from_dict({"optim": {"lr": 1.0, "warmup_steps": 4, "ema_decay": 0.5}})
    rates: list[float] = []

    def every_second_step_skipped(model, batch, optimizer, generator) -> StepMetrics:
        rates.append(optimizer.param_groups[0]["lr"])
        return StepMetrics(float(len(rates)), 1.0, skipped=len(rates) % 2 == 0)

    racer = make_contender(
        torch.nn.Linear(1, 1, bias=False),
        every_second_step_skipped,
        torch.zeros(8, 1, 1, 1, dtype=torch.uint8),
        config,
        batch_size=2,
        seconds=1e9,
        max_steps=4,
    )
    while not racer.trainer.done:
        racer.trainer.advance()
    assert rates == [0.25, 0.5, 0.75, 1.0]
    assert (racer.skipped, racer.ema.updates) == (2, 2)
    assert (racer.trainer.result().steps, racer.trainer.result().last_loss) == (4, 4.0)
