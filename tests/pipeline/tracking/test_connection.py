"""The tracking connection: configs become params, never with a URL's user:password@."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.tracking.connection import ensure_experiment, log_config_params
from pipeline.train.config import TrainConfig


def test_config_params_are_dotted_keys_with_json_values_and_no_url_credentials(
    tmp_path: Path,
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment = ensure_experiment(uri, "params")
    client = MlflowClient(uri)
    run_id = client.create_run(experiment).info.run_id
    config = TrainConfig.from_dict(
        {"mlflow": {"tracking_uri": "https://bob:s3cret@mlflow.example:5000/"}, "max_steps": 7}
    )
    log_config_params(run_id, config, exclude=("storage",))
    params = client.get_run(run_id).data.params
    assert params["mlflow.tracking_uri"] == "https://mlflow.example:5000/"
    assert params["max_steps"] == "7"
    assert params["model.image_shape"] == "[1, 28, 28]"
    assert not any(key.startswith("storage.") for key in params)
    assert not any("s3cret" in value for value in params.values())
