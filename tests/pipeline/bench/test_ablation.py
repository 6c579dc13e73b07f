"""`flowray bench --suite ablation`: lever resolution against this build, the table, a smoke run
end to end with Ray, MLflow, s3fs, webdataset, normflows and psutil unimportable (as on a machine that
has only torch and the project's light dependencies)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.bench.ablation import Lever, resolve, table

REPO = Path(__file__).resolve().parents[3]

# Put first on PYTHONPATH, Python imports it at start-up in this process and every child.
BLOCKER = """
import importlib.abc, sys
BLOCK = {"ray", "mlflow", "s3fs", "webdataset", "braceexpand", "normflows", "boto3", "psutil"}
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCK:
            raise ImportError(f"blocked for this test: {name}")
sys.meta_path.insert(0, _Block())
"""


def test_importing_the_suite_loads_neither_ray_nor_mlflow() -> None:
    code = (
        "import sys, pipeline.bench.ablation, pipeline.bench.harness, "
        "pipeline.train.step, jobs.config, jobs.bench; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'fsspec'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


def test_a_key_this_build_lacks_is_dropped_with_the_reason() -> None:
    partial = resolve(
        Lever("mixed", "two changes", ("model.no_such_field=1", "optim.schedule=cosine")),
        "fashion-mnist",
    )
    assert partial.runnable and partial.overrides == ("optim.schedule=cosine",)
    assert list(partial.dropped) == ["model.no_such_field"]
    assert "without model.no_such_field" in partial.change
    missing = resolve(Lever("new", "a model option", ("model.no_such_field=1",)), "fashion-mnist")
    assert not missing.runnable and missing.overrides == ()
    assert resolve(Lever("baseline", "the preset"), "fashion-mnist").runnable


def test_table_gives_each_lever_its_delta_to_the_baseline() -> None:
    figures = {"steps": 100, "images_per_second": 850.0, "test_images": 10000}
    report = {
        "settings": {
            "preset": "fashion-mnist",
            "minutes": 10,
            "parallel": 7,
            "threads": 2,
            "load_average_after": [1.0],
        },
        "levers": [
            {"lever": "baseline", "change": "as is", **figures, "test_bits_per_dim": 3.30},
            # A fractional rate prints rounded.
            {
                "lever": "cosine",
                "change": "decay",
                **figures,
                "images_per_second": 99.591,
                "test_bits_per_dim": 3.21,
            },
            {"lever": "gated", "change": "gated", "skipped": "model.conditioner: unknown"},
        ],
    }
    text = table(report).markdown()
    assert "| baseline | as is | 100 | 850 | 3.3000 | +0.000 |" in text
    assert "| cosine | decay | 100 | 100 | 3.2100 | -0.090 |" in text
    assert "| gated | gated: skipped (model.conditioner: unknown) |" in text
    assert "10,000 test images" in text and "7 lever(s) side by side" in text


@pytest.mark.timeout(600)
@pytest.mark.integration  # trains two levers in subprocesses
def test_smoke_run_without_ray_or_mlflow_writes_a_table_of_finite_figures(
    tmp_path: Path, fashion_mnist_dir: Path
) -> None:
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    env = {
        **os.environ,
        "FASHION_MNIST_DIR": str(fashion_mnist_dir),
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "blocker"), str(REPO)]),
    }
    out = tmp_path / "out"
    command = [sys.executable, "-m", "jobs.bench", "ablation", "--smoke"]
    command += ["--set", "levers=[baseline,cosine]", "--output", str(out)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=580)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "ablation.json").read_text())
    assert [row["lever"] for row in report["levers"]] == ["baseline", "cosine"]
    for row in report["levers"]:
        assert row["steps"] >= 1 and row["test_images"] == 256
        assert math.isfinite(row["test_bits_per_dim"]) and 0 < row["test_bits_per_dim"] < 16
        assert math.isfinite(row["images_per_second"]) and row["images_per_second"] > 0
    assert report["levers"][1]["overrides"] == ["optim.schedule=cosine"]
    assert report["machine"]["ray"] is None  # really ran without Ray
    assert "| baseline |" in report["markdown"] and "| cosine |" in report["markdown"]
    assert (out / "ablation" / "cosine.json").exists()
