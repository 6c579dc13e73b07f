"""The served model without Ray Serve: answers that strict JSON can carry when a bits/dim is not
finite, and a replica that refuses to reload a model of another image shape."""

from __future__ import annotations

import json
import logging
import math

import mlflow
import numpy as np
import torch

from pipeline.serve.model import ModelHolder, ServedModel
from pipeline.serve.requests import ScoreItem
from tests.pipeline.flow_fixtures import (
    MODEL_NAME,
    TrainedModel,
    trained_model,  # noqa: F401  (fixture)
)


class OverflowingScorer:
    """Scores like the batch Scorer, with the values a density that under- or overflows gives."""

    def __call__(self, batch: dict) -> dict:
        count = len(batch["key"])
        bits = np.array([math.inf, math.nan, -math.inf, 3.5])[:count]
        return {
            "key": batch["key"],
            "log_likelihood": -bits,
            "bits_per_dim": bits,
            "png_bits_per_dim": np.full(count, 2.0),
            "ood_score": bits - 2.0,
        }


def test_non_finite_scores_are_answered_as_strings_that_read_back_as_floats() -> None:
    model = ServedModel("ref", "flow", "1", (1, 2, 2), OverflowingScorer())
    items = [ScoreItem(np.zeros((1, 2, 2), np.uint8), f"k{i}") for i in range(4)]
    text = json.dumps(model.score(items), allow_nan=False)  # what the HTTP answer carries
    answers = json.loads(text)
    assert [a["bits_per_dim"] for a in answers] == ["Infinity", "NaN", "-Infinity", 3.5]
    assert [a["log_likelihood"] for a in answers[:3]] == ["-Infinity", "NaN", "Infinity"]
    read_back = [float(a["ood_score"]) for a in answers]
    assert read_back[0] == math.inf and math.isnan(read_back[1]) and read_back[3] == 1.5


def test_a_replica_keeps_serving_when_the_alias_moves_to_another_image_shape(
    trained_model: TrainedModel,  # noqa: F811
) -> None:
    from flowmodel import FlowConfig, build_flow
    from pipeline.tracking.registry import log_flow_model, register_flow

    mlflow.set_tracking_uri(trained_model.tracking_uri)
    name = "serve-shape"
    register_flow(f"models:/{MODEL_NAME}/1", name, 4.0)  # v1, 1x28x28, champion
    holder = ModelHolder(f"models:/{name}@champion", seed=0, draws=1, reload_interval_s=0)
    torch.manual_seed(0)
    rgb = build_flow(FlowConfig(image_shape=(3, 8, 8), levels=2, steps_per_level=1))
    rgb.initialize(torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8))
    experiment = mlflow.get_experiment_by_name("tests").experiment_id
    with mlflow.start_run(experiment_id=experiment):
        uri = log_flow_model(rgb.eval()).model_uri
    # Around register_flow (which refuses it): a version of another shape takes the alias.
    tags = {"val_bits_per_dim": "3.000000", "image_shape": "3x8x8"}
    version = str(mlflow.register_model(uri, name, tags=tags).version)
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", version)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    serve_log = logging.getLogger("ray.serve")  # may not propagate to the root logger
    serve_log.addHandler(handler)
    try:
        assert holder.check() is False
        assert holder.check() is False  # asked again: refused again, said once
    finally:
        serve_log.removeHandler(handler)
    assert (holder.current.version, holder.current.image_shape) == ("1", (1, 28, 28))
    refusals = [r.getMessage() for r in records if "not reloading" in r.getMessage()]
    assert refusals == [
        f"flowray: models:/{name}@champion moved to v{version} of image shape 3x8x8; "
        "not reloading: this replica serves 1x28x28 (v1) and its clients send that shape; "
        "serve the new version as its own deployment, under a new registered name"
    ]
    item = ScoreItem(np.zeros((1, 28, 28), np.uint8), "still-served")
    assert holder.current.score([item])[0]["version"] == "1"
