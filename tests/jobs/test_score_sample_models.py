"""The `flowray score|sample|models` entry points: results, reruns, a killed job, and the errors
users meet as one line plus a hint (exit code 2, no traceback)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from jobs import models as models_job
from jobs import sample as sample_job
from jobs import score as score_job
from jobs.errors import EXIT_REFUSED
from tests.pipeline.flow_fixtures import (
    MODEL_NAME,
    TrainedModel,
    prepare_fmnist,
    trained_model,  # noqa: F401  (fixture)
)

# Every test here runs a job (Ray, MLflow, a trained model) or a fresh flowray process.
pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def split(fashion_mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """600 held-out images in 6 shards."""
    out = tmp_path_factory.mktemp("jobs-data") / "data"
    return prepare_fmnist(fashion_mnist_dir, str(out), 600, 100)


def one_line_error(captured: str) -> None:
    assert "Traceback" not in captured
    lines = [line for line in captured.strip().splitlines() if "error:" in line or "hint:" in line]
    assert len(lines) == 2 and "error:" in lines[0] and "hint:" in lines[1], captured


@pytest.mark.usefixtures("ray_local")
def test_score_command_scores_then_skips_on_rerun(
    trained_model: TrainedModel,  # noqa: F811
    split: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    args = [
        "--model", f"models:/{MODEL_NAME}@champion", "--input", split,
        "--output", str(tmp_path / "scores"), "--tracking-uri", trained_model.tracking_uri,
        "--actors", "1", "--draws", "2",
    ]  # fmt: skip
    assert score_job.main(args) == 0
    assert "scored 600 images (6 shards written" in capsys.readouterr().out
    frame = pd.read_parquet(tmp_path / "scores" / f"model={MODEL_NAME}" / "version=1")
    assert len(frame) == 600 == frame["key"].nunique()
    assert score_job.main(args) == 0
    assert "nothing to score: all 6/6 shards" in capsys.readouterr().out
    # Other dequantization settings into the same output would mix results: refused.
    assert score_job.main([*args[:-2], "--draws", "1"]) == 2
    one_line_error(capsys.readouterr().err)


@pytest.mark.usefixtures("ray_local")
def test_score_exit_code_says_complete_partial_or_nothing_scored(
    trained_model: TrainedModel,  # noqa: F811
    split: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    data = tmp_path / "test"
    shutil.copytree(split, data)
    cut = data / "shard-000003.tar"
    cut.write_bytes(cut.read_bytes()[:-20_000])  # an interrupted copy
    # No --model: the scheduled jobs' way, from the environment.
    monkeypatch.setenv(score_job.MODEL_VARIABLE, f"models:/{MODEL_NAME}/1")
    args = [
        "--input", str(data), "--output", str(tmp_path / "scores"),
        "--tracking-uri", trained_model.tracking_uri, "--actors", "1",
    ]  # fmt: skip
    assert score_job.main(args) == 3
    captured = capsys.readouterr()
    assert "5 shards written, 0 already done, 1 shards (100 images) left out" in captured.out
    assert "  left out shard-000003.tar: shard has " in captured.out
    assert "1 shard(s) left out; a rerun with the same options tries them again" in captured.err
    # The rerun meets the same broken shard: still partial, nothing rewritten.
    assert score_job.main(args) == 3
    assert "5 already done, 1 shards (100 images) left out" in capsys.readouterr().out
    # Nothing of a split readable: a failure, not a green run.
    for shard in data.glob("shard-*.tar"):
        shard.write_bytes(shard.read_bytes()[:1000])
    assert score_job.main([*args[:3], str(tmp_path / "other"), *args[4:]]) == 1
    assert "no shard of 6 could be scored" in capsys.readouterr().err


@pytest.mark.slow  # two Ray start-ups in subprocesses: ~1.5 min on 2 cores
def test_score_command_killed_mid_run_then_rerun_scores_each_key_once(
    trained_model: TrainedModel,  # noqa: F811
    split: str,
    tmp_path: Path,
) -> None:
    out = tmp_path / "scores"
    prefix = out / f"model={MODEL_NAME}" / "version=1"
    command = [
        sys.executable, "-m", "jobs.score", "--model", f"models:/{MODEL_NAME}/1",
        "--input", split, "--output", str(out), "--tracking-uri", trained_model.tracking_uri,
        "--actors", "1", "--batch-size", "25",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    job = subprocess.Popen(
        command, cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(prefix.glob("shard-*.parquet")) and time.monotonic() < deadline:
            assert job.poll() is None, "the job ended before writing a shard"
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver and the Ray it started
        job.wait()
    killed_with = len(list(prefix.glob("shard-*.parquet")))
    assert 1 <= killed_with < 6

    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{killed_with} already done" in result.stdout
    frame = pd.read_parquet(prefix)
    assert len(frame) == 600 and frame["key"].nunique() == 600


@pytest.mark.parametrize(
    ("case", "expected", "exit_code"),
    [
        (
            "alias",
            "not found: 'fmnist-test' has aliases @candidate -> v1, @champion -> v1 "
            "(searched sqlite:///",
            2,
        ),
        ("input", "no data at", 2),
        ("server", "MLflow tracking server at http://127.0.0.1:9 is not reachable", 1),
        ("shape", "holds images of shape", 2),
    ],
)
def test_score_errors_are_one_line_with_a_hint(
    trained_model: TrainedModel,  # noqa: F811
    split: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    case: str,
    expected: str,
    exit_code: int,
) -> None:
    import numpy as np

    from tests.pipeline.flow_fixtures import prepare_array

    model, data, uri = f"models:/{MODEL_NAME}@champion", split, trained_model.tracking_uri
    if case == "alias":
        model = f"models:/{MODEL_NAME}@nope"
    elif case == "input":
        data = str(tmp_path / "missing")
    elif case == "server":
        uri = "http://127.0.0.1:9"
    elif case == "shape":
        images = np.zeros((4, 32, 32), dtype=np.uint8)
        data = prepare_array(images, tmp_path / "big", per_shard=4)
    started = time.monotonic()
    code = score_job.main(
        ["--model", model, "--input", data, "--output", str(tmp_path / "o"), "--tracking-uri", uri]
    )
    assert code == exit_code and time.monotonic() - started < 30
    err = capsys.readouterr().err
    one_line_error(err)
    assert expected in err


@pytest.mark.usefixtures("ray_local")
def test_sample_command_writes_shards_and_grid(
    trained_model: TrainedModel,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    args = [
        "--model", str(trained_model.directory), "--output", str(tmp_path / "s"), "-n", "12",
        "--seed", "3", "--tracking-uri", trained_model.tracking_uri, "--set", "grid_images=4",
    ]  # fmt: skip
    assert sample_job.main(args) == 0
    assert "generated 12 images" in capsys.readouterr().out
    assert (tmp_path / "s" / "manifest.json").exists() and (tmp_path / "s" / "grid.png").exists()


def test_models_list_and_promote_refuses_a_worse_version_unless_forced(
    trained_model: TrainedModel,  # noqa: F811
    capsys: pytest.CaptureFixture,
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.registry import register_flow

    mlflow.set_tracking_uri(trained_model.tracking_uri)
    client = MlflowClient()
    source = client.get_model_version(MODEL_NAME, "1")
    name = "fmnist-promote"
    register_flow(f"models:/{MODEL_NAME}/1", name, 4.0, source.run_id)  # v1, champion
    register_flow(f"models:/{MODEL_NAME}/1", name, 4.2, source.run_id)  # v2: worse, candidate

    uri = ["--tracking-uri", trained_model.tracking_uri]
    assert models_job.main(["list", "--name", name, *uri]) == 0
    listing = capsys.readouterr().out
    assert "@candidate -> v2, @champion -> v1" in listing
    rows = {line.split()[0]: line for line in listing.splitlines()[2:]}
    assert "4.2000" in rows["2"] and "candidate" in rows["2"]
    assert "4.0000" in rows["1"] and "champion" in rows["1"]

    assert models_job.main(["promote", name, "2", *uri]) == EXIT_REFUSED == 4
    assert "refused" in capsys.readouterr().err
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert models_job.main(["promote", name, "2", "--force", *uri]) == 0
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert models_job.main(["promote", name, "9", *uri]) == 2
    one_line_error(capsys.readouterr().err)


def test_models_list_names_the_store_it_searched_and_keeps_mlflows_lines_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a folder with no store yet: no MLflow "Creating initial MLflow database tables..."
    lines unless -v, and the empty listing says where it looked (the default work folder)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FLOWRAY_"))}
    command = [sys.executable, "-m", "jobs.cli", "models", "list"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    store = f"sqlite:///{tmp_path.resolve()}/flowray-work/mlflow.db"
    assert result.stdout.strip() == f"no registered models at {store}"
    assert "Creating initial MLflow database tables" not in result.stdout + result.stderr
    env["FLOWRAY_WORKDIR"] = str(tmp_path / "w")
    result = subprocess.run(
        [*command, "--name", "fashion-flow", "-v"], cwd=tmp_path, env=env, capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        f"no registered model 'fashion-flow' (registered: none; searched sqlite:///{tmp_path.resolve()}/w/mlflow.db)"
        in result.stderr
    )
    assert "Creating initial MLflow database tables" in result.stderr  # -v shows them
