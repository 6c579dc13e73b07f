"""`flowray bench --suite serving --smoke`: the serving benchmark runs end to end on loopback at
1, 8 and 64 concurrent clients, bounded, and reports finite figures; with 64 clients, requests
share forward passes. No timing thresholds: the machine is shared."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


pytestmark = pytest.mark.integration  # Ray Serve and a trained model in a subprocess


def test_serving_smoke_reports_every_level_with_batching(
    fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    import os

    env = {**os.environ, "FASHION_MNIST_DIR": str(fashion_mnist_dir)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.bench",
            "--smoke",
            "--suite",
            "serving",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "serving.json").read_text())
    levels = {row["clients"]: row for row in report["levels"]}
    assert sorted(levels) == [1, 8, 64]
    for row in levels.values():
        assert row["errors"] == 0
        assert 0 < row["requests"] <= 48  # bounded
        for name in ("requests_per_second", "p50_ms", "p95_ms", "mean_batch"):
            assert math.isfinite(row[name]) and row[name] > 0, (row["clients"], name)
    assert levels[1]["mean_batch"] == 1.0  # one client: nothing to batch with
    assert levels[64]["mean_batch"] > 1.0  # 64 clients: images share forward passes
    assert report["ceiling_images_per_second"] > 0
    assert "| 64 |" in (tmp_path / "serving.md").read_text()
