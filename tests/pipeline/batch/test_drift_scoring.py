"""Calibration stored with a registered version, the `flagged` column and the drift verdict of a
scoring run (summary.json, MLflow), `flowray scores drift` and `flowray models calibrate`."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from jobs import models as models_job
from jobs import scores as scores_job
from jobs.errors import EXIT_DRIFT
from jobs.score import print_result
from pipeline.batch.scoring.job import ScoreConfig, score
from pipeline.batch.scoring.output import FLAG_THRESHOLD_KEY
from pipeline.data.reader import iter_input
from pipeline.data.tally import SkipTally
from pipeline.model.artifact import load_flow
from pipeline.model.calibration import calibrate_flow
from pipeline.tracking.connection import ensure_experiment
from pipeline.tracking.registry import load_calibration, log_flow_model, register_flow
from tests.pipeline.flow_fixtures import (
    TrainedModel,
    prepare_array,
    prepare_fmnist,
    trained_model,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.usefixtures("ray_local")

CALIBRATED, UNCALIBRATED = "fmnist-calibrated", "fmnist-uncalibrated"


@pytest.fixture(scope="module")
def registered(
    trained_model: TrainedModel,  # noqa: F811
    fashion_mnist_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, str]:
    """The trained flow registered twice: CALIBRATED with a calibration on 400 held-out images
    (the split, returned), UNCALIBRATED without one; and a drop of 200 noise images."""
    root = tmp_path_factory.mktemp("drift")
    split = prepare_fmnist(fashion_mnist_dir, str(root / "data"), 400, 200)
    noise = np.random.default_rng(0).integers(0, 256, (200, 28, 28), dtype=np.uint8)
    foreign = prepare_array(noise, root / "noise", 100)
    mlflow.set_tracking_uri(trained_model.tracking_uri)
    flow = load_flow(trained_model.directory)
    rows = iter_input(split, shape=(1, 28, 28), on_error="skip", tally=SkipTally())
    calibration = calibrate_flow(flow, rows, seed=0, draws=1)
    experiment = ensure_experiment(trained_model.tracking_uri, "drift-tests")
    with mlflow.start_run(experiment_id=experiment):
        uri = log_flow_model(flow).model_uri
        register_flow(uri, CALIBRATED, 4.5, calibration=calibration)
        register_flow(uri, UNCALIBRATED, 4.5)
    return split, foreign


def config(trained: TrainedModel, model: str, input: str, output: Path, **kwargs) -> ScoreConfig:
    return ScoreConfig(
        model=f"models:/{model}/1",
        input=input,
        output=str(output),
        tracking_uri=trained.tracking_uri,
        batch_size=128,
        actors=1,
        least_likely=4,
        **kwargs,
    )


def test_registration_stores_the_calibration_with_the_version(
    registered: tuple[str, str],
    trained_model: TrainedModel,  # noqa: F811
) -> None:
    mlflow.set_tracking_uri(trained_model.tracking_uri)
    tags = MlflowClient().get_model_version(CALIBRATED, "1").tags
    calibration = load_calibration(CALIBRATED, "1")
    assert calibration is not None and calibration.count == 400
    assert tags["calibration.count"] == "400"
    assert float(tags["calibration.threshold"]) == pytest.approx(calibration.threshold(), abs=1e-6)
    assert calibration.threshold() == pytest.approx(np.quantile(calibration.ood_score, 0.95))
    assert tags["calibration"].endswith("/calibration/v1.json")
    assert load_calibration(UNCALIBRATED, "1") is None


def test_score_writes_flags_and_a_verdict_of_none_for_the_calibration_images(
    registered: tuple[str, str],
    trained_model: TrainedModel,  # noqa: F811
    tmp_path: Path,
) -> None:
    split, _ = registered
    result = score(config(trained_model, CALIBRATED, split, tmp_path))
    calibration = load_calibration(CALIBRATED, "1")
    threshold = calibration.threshold()
    frame = pd.read_parquet(result.output)
    assert frame["flagged"].tolist() == (frame["ood_score"] > threshold).tolist()
    # The very images and seed of the calibration: 5% of 400 above their 95th percentile.
    assert frame["flagged"].sum() == 20
    metadata = pq.read_schema(next(Path(result.output).glob("*.parquet"))).metadata
    assert float(metadata[FLAG_THRESHOLD_KEY.encode()]) == threshold
    summary = json.loads((Path(result.summary_url) / "summary.json").read_text())
    assert result.drift_level == summary["drift"]["level"] == "none"
    assert summary["drift"]["line"] == result.drift
    assert result.drift.startswith("drift: none (flagged 5.0% vs 5% expected")
    assert summary["metrics"]["drift_flagged_share"] == 0.05
    assert summary["metrics"]["drift_ks_statistic"] == 0.0
    assert sorted(summary["files"]) == sorted(p.name for p in Path(result.output).glob("*.parquet"))
    assert (Path(result.summary_url) / "ood_score_histogram.png").stat().st_size > 1000
    run = MlflowClient(trained_model.tracking_uri).get_run(result.mlflow_run_id)
    assert run.data.tags["flowray.drift"] == "none" and run.data.metrics["drift_level"] == 0


def test_a_drop_of_noise_is_detected_and_fails_at_the_asked_level(
    registered: tuple[str, str],
    trained_model: TrainedModel,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, foreign = registered
    result = score(config(trained_model, CALIBRATED, foreign, tmp_path))
    assert result.drift_level == "detected"
    assert print_result(result) == 0
    assert print_result(result, "detected") == EXIT_DRIFT == 5
    argv = ["drift", "--output", str(tmp_path), "--model", f"{CALIBRATED}/1", "--run", "latest"]
    argv += ["--tracking-uri", trained_model.tracking_uri, "--fail-on", "detected"]
    capsys.readouterr()
    assert scores_job.main(argv) == EXIT_DRIFT
    assert result.drift in capsys.readouterr().out  # recomputed from the files: the same line


def test_a_version_without_calibration_scores_and_says_how_to_calibrate_it(
    registered: tuple[str, str],
    trained_model: TrainedModel,  # noqa: F811
    tmp_path: Path,
) -> None:
    split, _ = registered
    result = score(config(trained_model, UNCALIBRATED, split, tmp_path))
    assert result.drift_level == "unknown"
    assert result.drift == (
        f"drift: unknown (model version has no calibration: run flowray models calibrate "
        f"{UNCALIBRATED} 1 --data <its validation split>)"
    )
    assert pd.read_parquet(result.output)["flagged"].isna().all()
    argv = ["calibrate", UNCALIBRATED, "1", "--data", split, "--images", "300"]
    assert models_job.main([*argv, "--tracking-uri", trained_model.tracking_uri]) == 0
    mlflow.set_tracking_uri(trained_model.tracking_uri)
    assert load_calibration(UNCALIBRATED, "1").count == 300
