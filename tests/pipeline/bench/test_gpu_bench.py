"""pipeline.bench.gpu on the CPU: its smoke mode runs every phase in a Python where importing
Ray, MLflow, webdataset, s3fs, fsspec or psutil fails, as on the bare GPU box it is written for."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BLOCKED = ("ray", "mlflow", "webdataset", "s3fs", "fsspec", "psutil")
# Runs the bench as __main__ after a meta-path finder that refuses the blocked packages.
RUNNER = """
import importlib.abc, runpy, sys
BLOCKED = {blocked!r}
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{{name}} is not installed on the GPU box", name=name)
        return None
sys.meta_path.insert(0, Refuse())
sys.argv = ["pipeline.bench.gpu", *{argv!r}]
runpy.run_module("pipeline.bench.gpu", run_name="__main__")
"""


def run_bench(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    code = RUNNER.format(blocked=BLOCKED, argv=list(argv))
    root = Path(__file__).resolve().parents[3]
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def table_rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] not in ("what", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def number(text: str) -> float:
    return float(text.replace(",", ""))


@pytest.mark.timeout(330)
def test_cpu_smoke_runs_every_phase_without_ray_mlflow_or_s3_packages(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    result = run_bench("--device", "cpu", "--small", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    assert table.strip() in result.stdout
    rows = table_rows(table)
    for name in ("train fp32", "train bf16", "train fp32, DDP (world 1, gloo)"):
        rate, bits, _ = rows[name]
        assert number(rate) > 0 and 0 < number(bits) < 9, (name, rows[name])
    assert rows["train bf16, compiled"][2] == "not run (--no-compile)"
    for name in ("score fp32 (predict_frame)", "score bf16 (predict_frame)"):
        assert number(rows[name][0]) > 0 and 0 < number(rows[name][1]) < 9, name
    assert re.search(r"ratio \d+\.\d\d", rows["score fp32 (predict_frame)"][2])
    assert number(rows["sample (Flow.sample, temperature 0.7)"][0]) > 0
    # The reloaded checkpoint gives exactly the log p of the weights it was written from.
    assert "same log p on the cpu (gap 0e+00)" in rows["checkpoint round trip"][2]
    assert list(rows)[-1] == "train bf16, compiled"  # last, so that a slow compile loses nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_and_exits_zero() -> None:
    result = run_bench(timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == (
        "no CUDA device on this machine: the GPU bench did not run "
        "(--device cpu --small runs its CPU smoke)"
    )


@pytest.mark.timeout(330)
def test_precision_race_reports_both_precisions_from_interleaved_steps(tmp_path: Path) -> None:
    out = tmp_path / "race.md"
    result = run_bench("--device", "cpu", "--small", "--train-only", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table_rows(out.read_text())
    assert list(rows) == ["race fp32", "race bf16"]
    for rate, bits, _ in rows.values():
        assert number(rate) > 0 and 0 < number(bits) < 9
    assert re.match(r"x\d+\.\d\d of fp32; [+-]\d\.\d{5} bits/dim", rows["race bf16"][2])
