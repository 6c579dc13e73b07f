"""pipeline.bench.gpu on the CPU: its smoke mode runs every phase in a Python where importing
Ray, MLflow, webdataset, s3fs, fsspec or psutil fails, as on the bare GPU box it is written for."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.bench.gpu import NA, OPTIONS, main

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
runpy.run_module("pipeline.bench.gpu", run_name="__main__", alter_sys=True)
"""


def run_bench(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    code = RUNNER.format(blocked=BLOCKED, argv=list(argv))
    root = Path(__file__).resolve().parents[3]
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=timeout
    )


def table_rows(markdown: str, width: int) -> dict[str, list[list[str]]]:
    """{first cell: [the other cells of each row]} of the Markdown rows with `width` cells."""
    rows: dict[str, list[list[str]]] = {}
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == width and cells[0] not in ("what", "profile"):
            rows.setdefault(cells[0], []).append(cells[1:])
    return rows


def main_rows(markdown: str) -> dict[str, list[str]]:
    """The main table: {what: [images/s, bits/dim, host syncs/step, notes]}."""
    return {what: cells[0] for what, cells in table_rows(markdown, 5).items()}


def number(text: str) -> float:
    return float(text.replace(",", ""))


@pytest.mark.timeout(330)
def test_cpu_smoke_runs_every_phase_without_ray_mlflow_or_s3_packages(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    result = run_bench("--device", "cpu", "--small", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    markdown = out.read_text()
    assert markdown.strip() in result.stdout
    rows = main_rows(markdown)
    # The option matrix is complete, in order; the compiled options come last.
    trained = [name for name in rows if name.startswith("train ")]
    assert trained[:9] == [f"train {option.name}" for option in OPTIONS if not option.compile]
    assert list(rows)[-3:] == [f"train {option.name}" for option in OPTIONS if option.compile]
    for option in OPTIONS:
        rate, bits, syncs, note = rows[f"train {option.name}"]
        if option.cuda_only:
            assert (rate, bits, syncs, note) == ("n/a", "n/a", "n/a", NA), option
            continue
        # Measured on the CPU; host syncs are counted on CUDA only.
        assert number(rate) > 0 and 0 < number(bits) < 9 and syncs == "n/a", (option, rate, bits)
        assert re.match(r"x\d+\.\d\d of eager, [+-]\d\.\d{4} bits/dim; \d+ steps of batch", note)
    assert "batch 32, lr 0.002" in rows["train batch_x4"][3]  # 4x the batch, sqrt(4)x the lr
    assert "batch 128, lr 0.004" in rows["train batch_x16"][3]
    for name in ("score fp32 (predict_frame)", "score bf16 (predict_frame)"):
        assert number(rows[name][0]) > 0 and 0 < number(rows[name][1]) < 9, name
        assert re.search(r"ratio \d+\.\d\d", rows[name][3]), name
    assert number(rows["sample (Flow.sample, temperature 0.7)"][0]) > 0
    # The reloaded checkpoint gives exactly the log p of the weights it was written from.
    assert "same log p on the cpu (gap 0e+00)" in rows["checkpoint round trip"][3]
    # The profile: host ops with their times for a training step and a scoring batch.
    profile = table_rows(markdown, width=4)
    for what in ("training step of 8", "scoring batch of 32"):
        assert profile[f"{what}: device"] == [[NA, "-", "-"]]
        host = profile[f"{what}: host"]
        assert len(host) == 3 and all(number(ms) >= 0 and int(calls) > 0 for _, ms, calls in host)
        line = rf"{what}: [\d.]+ ms wall under the profiler; device busy: {re.escape(NA)}"
        assert re.search(line, markdown), what
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["figures"]["train eager: images_per_second"] == pytest.approx(
        number(rows["train eager"][0]), rel=0.01, abs=1
    )
    assert [table["headers"][0] for table in report["tables"]] == ["what", "profile"]


def test_an_exhausted_budget_runs_no_option_and_says_so(capsys: pytest.CaptureFixture) -> None:
    assert main(["--device", "cpu", "--small", "--set", "budget_s=0"]) == 0
    rows = main_rows(capsys.readouterr().out)
    for option in OPTIONS:
        note = rows[f"train {option.name}"][3]
        expected = (
            re.escape(NA) if option.cuda_only else r"not run \(budget: -?\d+ s left, 0 needed\)"
        )
        assert re.fullmatch(expected, note), note
    assert "score fp32 (predict_frame)" not in rows  # nothing trained: no model to score


def test_unknown_option_names_are_refused() -> None:
    with pytest.raises(ValueError, match=r"options: expected names from \['eager'.*\['fast'\]"):
        main(["--device", "cpu", "--small", "--set", "options=[eager,fast]"])


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
    result = run_bench("--device", "cpu", "--small", "--set", "train_only=true", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = main_rows(out.read_text())
    assert list(rows) == ["race fp32", "race bf16"]
    for rate, bits, _, _ in rows.values():
        assert number(rate) > 0 and 0 < number(bits) < 9
    assert re.match(r"x\d+\.\d\d of fp32; [+-]\d\.\d{5} bits/dim", rows["race bf16"][3])
