"""`mlflow models serve -m models:/<name>@champion --env-manager local`: a real server process on
a loopback port answers a JSON POST of real test images with the log-likelihood and bits/dim
that `flowray score` wrote for the same images (same keys, same seed), answers the model's own
input example, and refuses bad pixels with a 400 that says what it expected."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tests.pipeline.flow_fixtures import MODEL_NAME, TrainedModel
from tests.pipeline.serve.conftest import ScoredImages, free_port

START_TIMEOUT_S = 240  # imports torch and MLflow, downloads and loads the model, on a loaded box


def post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_until_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    """Poll GET /health until it answers 200; fail fast if the server exits first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"mlflow models serve exited {process.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)  # a poll interval, not a wait for a condition
    pytest.fail(
        f"mlflow models serve not healthy after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
    )


@pytest.fixture(scope="module")
def served(trained_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow models serve` of the champion on a free loopback port; its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("mlflow-serve") / "server.log"
    bin_dir = Path(sys.executable).parent
    # The server execs `uvicorn` by name: the virtualenv's bin must be on PATH, as it is for a
    # user who activated it.
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": trained_model.tracking_uri,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    mlflow_cli = bin_dir / "mlflow"
    command = [
        str(mlflow_cli), "models", "serve", "-m", f"models:/{MODEL_NAME}@champion",
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
    ]  # fmt: skip
    with log.open("w") as output:
        # Its own session: the server's uvicorn worker processes are stopped with it.
        process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, log)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def test_a_json_post_answers_what_flowray_score_wrote_for_the_same_images(
    served: str, scored_images: ScoredImages
) -> None:
    # JSON numbers: the body is plain ints, as any HTTP client sends them.
    body = {
        "inputs": scored_images.images.astype(int).tolist(),
        "params": {"keys": scored_images.keys, "seed": scored_images.seed},
    }
    status, answer = post(f"{served}/invocations", body)
    assert status == 200, answer
    predictions = answer["predictions"]
    assert [row["key"] for row in predictions] == scored_images.keys
    expected = scored_images.rows.loc[scored_images.keys]
    assert [row["bits_per_dim"] for row in predictions] == pytest.approx(
        expected["bits_per_dim"].tolist(), abs=1e-5
    )
    assert [row["log_likelihood"] for row in predictions] == pytest.approx(
        expected["log_likelihood"].tolist(),
        abs=1e-2,  # nats: 784 * ln 2 * bits/dim
    )
    assert all(2.0 < row["bits_per_dim"] < 8.0 for row in predictions)


def test_without_keys_the_answer_does_not_depend_on_the_batch(
    served: str, scored_images: ScoredImages
) -> None:
    images = scored_images.images[:3].astype(int)
    status, together = post(f"{served}/invocations", {"inputs": images.tolist()})
    assert status == 200, together
    status, alone = post(f"{served}/invocations", {"inputs": images[2:3].tolist()})
    assert status == 200, alone
    assert together["predictions"][2] == alone["predictions"][0]
    assert alone["predictions"][0]["key"].startswith("sha256:")


def test_the_models_own_input_example_is_answered(served: str, trained_model: TrainedModel) -> None:
    mlflow.set_tracking_uri(trained_model.tracking_uri)
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}@champion"))
    example = json.loads((model_dir / "serving_input_example.json").read_text())
    status, answer = post(f"{served}/invocations", example)
    assert status == 200, answer
    assert len(answer["predictions"]) == len(example["inputs"]) == 2
    assert all(np.isfinite(row["bits_per_dim"]) for row in answer["predictions"])


@pytest.mark.parametrize(
    ("pixel", "message"),
    [
        (256, "out of bounds for uint8"),  # MLflow's cast to the signature's uint8
        (-1, "out of bounds for uint8"),
    ],
)
def test_pixels_outside_0_255_are_refused_with_a_400(
    served: str, scored_images: ScoredImages, pixel: int, message: str
) -> None:
    images = scored_images.images[:1].astype(int)
    images[0, 0, 0, 0] = pixel
    status, answer = post(f"{served}/invocations", {"inputs": images.tolist()})
    assert status == 400
    assert message in answer["message"]


def test_a_wrong_image_shape_is_refused_with_a_400_saying_expected_and_found(
    served: str,
) -> None:
    status, answer = post(f"{served}/invocations", {"inputs": np.zeros((1, 1, 8, 8), int).tolist()})
    assert status == 400
    assert "(-1, 1, 28, 28)" in answer["message"] and "(1, 1, 8, 8)" in answer["message"]
