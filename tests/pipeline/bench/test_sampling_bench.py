"""The sampling suite: `flowray sample` and the in-process inverse pass side by side, one table."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipeline.bench import sampling
from pipeline.bench.harness import Run


@pytest.mark.slow  # a minute on 2 loaded cores: Ray tasks start, the flow initialises
@pytest.mark.usefixtures("ray_local", "fashion_mnist_dir")
def test_sampling_bench_reports_both_rates_and_their_ratio(tmp_path: Path) -> None:
    settings = sampling.Settings(images=48, repeats=1)
    report = sampling.measure(settings, Run(tmp_path, tmp_path)).report()
    results = report["results"]
    assert set(results) == {"in_process", "job", "job_draw"}
    assert all(math.isfinite(value) and value > 0 for value in results.values())
    assert report["ratio"] == pytest.approx(results["job"] / results["in_process"])
    assert report["chunk_size"] == 64 and report["images"] == 48
    assert "| flowray sample, end to end | 48 |" in report["markdown"]
    assert len(list(tmp_path.glob("samples-*/shard-*.tar"))) == 1  # the job wrote its shard
