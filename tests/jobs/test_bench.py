"""`flowray bench <suite> --smoke`: every suite runs end to end at tiny sizes and writes its JSON
and table; the CLI's settings (`--set`, `--config`, the deprecated options) and its usage errors.

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
        [sys.executable, "-m", "jobs.bench", suite, "--smoke", "--output", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"## {suite}" in done.stdout
    assert (out / f"{suite}.md").read_text().startswith(f"## {suite}")
    report = json.loads((out / f"{suite}.json").read_text())
    assert _positive(report["machine"]["cores"]) and report["suite"] == suite
    return report


def _check_quality(report: dict[str, Any]) -> None:
    for name in ("flowray", "normflows"):
        figures = report["models"][name]
        for key in ("params", "steps", "images_per_second", "test_bits_per_dim"):
            assert _positive(figures[key]), (name, key, figures[key])
    # Matched parameter counts: within 1% of each other.
    assert abs(report["ratios"]["params"] - 1) < 0.01
    assert "| flowray |" in report["markdown"] and "| normflows |" in report["markdown"]


def _check_io(report: dict[str, Any]) -> None:
    for backend in ("local", "s3"):
        for key in ("write", "read_iter", "read_ray", "mb"):
            assert _positive(report["results"][backend][key]), (backend, key)


def _check_gpu(report: dict[str, Any]) -> None:
    assert report["skipped"].startswith("no CUDA device on this machine")


def _check_training(report: dict[str, Any]) -> None:
    for key in ("flowray_in_process", "normflows_in_process", "ray_1_worker", "ray_2_workers"):
        assert _positive(report["images_per_second"][key]), key
    for key in ("ray_2_workers_vs_in_process", "flowray_vs_normflows"):
        assert _positive(report["ratios"][key]), key
    assert "threads" in report["markdown"]


def _check_scoring(report: dict[str, Any]) -> None:
    assert set(report["results"]) == {
        "raw_forward",
        "in_process",
        "score_local",
        "score_s3",
        "in_process_2x",
        "score_local_2x",
        "score_s3_2x",
    }
    for key, value in report["results"].items():
        assert _positive(value), key
    assert report["read_task"]["us_per_image"] > 0


def _check_sampling(report: dict[str, Any]) -> None:
    assert set(report["results"]) == {"in_process", "job", "job_draw"}
    assert all(_positive(value) for value in report["results"].values())


def _check_serving(report: dict[str, Any]) -> None:
    assert [level["clients"] for level in report["levels"]] == [1, 8, 64]
    for level in report["levels"]:
        assert level["errors"] == 0 and _positive(level["requests_per_second"]), level
    assert _positive(report["ceiling_images_per_second"])


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
    "serving": _check_serving,
    "sampling": _check_sampling,
}


@pytest.mark.integration  # each runs a suite in a subprocess: a minute on 2 cores
@pytest.mark.timeout(330)
@pytest.mark.parametrize("suite", ["quality", "io", "gpu"])
def test_smoke_suite_writes_finite_figures(
    suite: str, tmp_path: Path, fashion_mnist_dir: Path
) -> None:
    CHECKS[suite](_smoke(suite, tmp_path, fashion_mnist_dir, timeout=300))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("suite", ["training", "scoring", "sampling", "scaling", "serving"])
def test_slow_smoke_suite_writes_finite_figures(
    suite: str, tmp_path: Path, fashion_mnist_dir: Path
) -> None:
    CHECKS[suite](_smoke(suite, tmp_path, fashion_mnist_dir, timeout=880))


def test_settings_come_from_defaults_smoke_sizes_and_overrides() -> None:
    from jobs.bench import build_parser, settings_for

    settings = settings_for("quality", True, ["minutes=2", "preset=rgb32"])
    assert (settings.minutes, settings.preset, settings.max_steps) == (2.0, "rgb32", 3)
    scaling = settings_for("scaling", False, ["sizes=[100, 10]"])
    assert scaling.sizes == (100, 10) and scaling.fresh_ray
    from jobs.bench import _resolve

    parser = build_parser()
    args = parser.parse_args(["io", "--config", "rgb32", "--set", "repeats=2"])
    assert _resolve(parser, ["io", "quality"], args)["quality"].preset == "rgb32"
    assert _resolve(parser, ["io"], args)["io"].repeats == 2
    args = parser.parse_args(["--suite", "io", "--out", "x"])
    assert (args.suite_option, args.output) == ("io", "x")


@pytest.mark.parametrize(
    "argv",
    [
        ["quality", "--set", "no_such_setting=1"],
        ["quality", "--set", "minutes=soon"],
        ["no-such-suite"],
        ["io", "--suite", "quality"],
    ],
)
def test_usage_errors_exit_2_before_anything_runs(argv: list[str], tmp_path: Path) -> None:
    from jobs.bench import main

    with pytest.raises(SystemExit) as done:
        main([*argv, "--output", str(tmp_path)])
    assert done.value.code == 2
    assert not any(tmp_path.iterdir())
