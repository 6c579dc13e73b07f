"""Images whose bits/dim is not finite (a density that underflows to zero, a NaN from the flow):
the report counts them apart and summarises the finite ones, and `flowray score` over images that
overflow exits 0 with its summary, its MLflow run and the count."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from jobs import score as score_job
from pipeline.batch.scoring.report import ScoreStats, json_number
from tests.pipeline.flow_fixtures import (
    TrainedModel,
    prepare_array,
    trained_model,  # noqa: F401  (fixture)
)

# The top prior's log-sigma lowered by this much: latents are scaled by e^38, so the checkerboard
# (14,000 bits/dim under the test model) overflows float32 to an infinite bits/dim, while images
# with a few bits/dim stay finite (about 1e33 bits/dim at most: 1e5 below the overflow).
NARROWING = 38.0


def rows(bits: list[float], keep: bool = True) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "bits_per_dim": np.asarray(bits, dtype=np.float64),
            "key": [f"k{i}" for i in range(len(bits))],
            "png": [b"png" if keep else b"" for _ in bits],
        }
    )


def test_stats_count_non_finite_apart_and_summarise_the_finite() -> None:
    stats = ScoreStats(keep=3)
    stats.add(rows([3.1, math.inf, 2.9, math.nan, 3.0, -math.inf]))
    stats.add(rows([3.2]))
    assert (stats.count, stats.non_finite, stats.finite) == (7, 3, 4)
    assert stats.mean == pytest.approx((3.1 + 2.9 + 3.0 + 3.2) / 4)
    assert stats.quantile(0.5) == pytest.approx(3.0, abs=1e-3)
    assert stats.quantile(0.99) == pytest.approx(3.2, abs=1e-3)
    counts, edges = stats.histogram(bins=4)
    assert counts.sum() == 4 and edges[0] <= 2.9 and edges[-1] >= 3.2
    # The least likely are the non-finite ones first (+inf, NaN, -inf: unusual either way).
    assert [key for _, key, _ in stats.least_likely()] == ["k1", "k3", "k5"]


def test_a_huge_finite_value_lands_in_the_last_bin_not_the_first() -> None:
    stats = ScoreStats(keep=0)
    stats.add(rows([2.0, 1e33], keep=False))
    assert stats.quantile(0.4) == pytest.approx(2.0, abs=1e-3)
    assert stats.quantile(0.99) == pytest.approx(64.0, abs=1e-3)  # the histogram's ceiling


def test_stats_with_only_non_finite_values_have_no_figures() -> None:
    stats = ScoreStats(keep=2)
    stats.add(rows([math.inf, math.nan]))
    assert (stats.count, stats.non_finite, stats.finite) == (2, 2, 0)
    assert math.isnan(stats.mean) and math.isnan(stats.quantile(0.5))
    counts, edges = stats.histogram()
    assert len(counts) == 0 and len(edges) == 0


def test_json_numbers_read_back_as_the_same_floats() -> None:
    values = [math.inf, -math.inf, math.nan, 3.25]
    text = json.dumps([json_number(v) for v in values], allow_nan=False)
    back = [float(v) for v in json.loads(text)]
    assert back[:2] == [math.inf, -math.inf] and math.isnan(back[2]) and back[3] == 3.25


def odd_images() -> np.ndarray:
    """All-0, all-255, checkerboard and random binary 28 x 28 images, twice each: [8, 28, 28]."""
    rows_, cols = np.mgrid[:28, :28]
    checker = ((rows_ + cols) % 2 * 255).astype(np.uint8)
    binary = (np.random.default_rng(0).integers(0, 2, (28, 28)) * 255).astype(np.uint8)
    one = np.stack(
        [np.zeros((28, 28), np.uint8), np.full((28, 28), 255, np.uint8), checker, binary]
    )
    return np.concatenate([one, one])


def narrowed_copy(directory: Path, target: Path) -> Path:
    """The model with its top prior's sigma divided by e^NARROWING."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(directory, target)
    weights = load_file(target / "model.safetensors")
    weights["top_prior.log_sigma"] = weights["top_prior.log_sigma"] - NARROWING
    save_file(weights, target / "model.safetensors")
    return target


def score_and_read(model: str, split: str, output: Path, tracking_uri: str) -> tuple[dict, dict]:
    """Runs `flowray score`; (summary.json, the MLflow summary run's metrics)."""
    args = [
        "--model", model, "--input", split, "--output", str(output),
        "--tracking-uri", tracking_uri, "--actors", "1", "--experiment", "non-finite",
    ]  # fmt: skip
    assert score_job.main(args) == 0
    (summary_file,) = output.glob("model=*/version=*/_summary/*/summary.json")
    summary = json.loads(summary_file.read_text())  # strict JSON: no bare Infinity / NaN
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("non-finite")
    (run,) = client.search_runs(
        [experiment.experiment_id], f"tags.model_version = '{summary['model_version']}'"
    )
    return summary, run.data.metrics


@pytest.mark.usefixtures("ray_local")
def test_score_command_over_images_that_overflow_exits_0_and_reports_the_count(
    trained_model: TrainedModel,  # noqa: F811
    tmp_path: Path,
) -> None:
    split = prepare_array(odd_images(), tmp_path / "odd", per_shard=4)
    # The test model itself gives them finite, large bits/dim (the checkerboard about 14,000).
    summary, metrics = score_and_read(
        str(trained_model.directory), split, tmp_path / "scores", trained_model.tracking_uri
    )
    assert summary["metrics"]["images_scored"] == 8 == metrics["images_scored"]
    assert summary["metrics"]["images_non_finite"] == 0 == metrics["images_non_finite"]
    # With a narrow prior the two checkerboards overflow float32: inf bits/dim, kept as inf.
    narrow = narrowed_copy(trained_model.directory, tmp_path / "narrow")
    summary, metrics = score_and_read(
        str(narrow), split, tmp_path / "narrow-scores", trained_model.tracking_uri
    )
    frame = pd.read_parquet(next((tmp_path / "narrow-scores").glob("model=*/version=*")))
    assert int(np.isinf(frame["bits_per_dim"]).sum()) == 2
    assert np.isinf(frame["ood_score"]).sum() == 2
    assert summary["metrics"]["images_non_finite"] == 2 == metrics["images_non_finite"]
    assert summary["metrics"]["images_scored"] == 8 == metrics["images_scored"]
    assert math.isfinite(metrics["median_bits_per_dim"])
    worst = summary["least_likely"][:2]
    assert [float(w["bits_per_dim"]) for w in worst] == [math.inf, math.inf]
