"""The batch jobs' one model resolver: every kind of reference loads the same weights, and scoring
and sampling name the model the same way (registry name/version, run-<id>, local)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.batch.resolve import BatchModel, resolve_batch_model
from pipeline.model.artifact import FlowPayload, load_flow
from tests.pipeline.flow_fixtures import (
    MODEL_NAME,
    TrainedModel,
    prepare_fmnist,
    trained_model,  # noqa: F401  (fixture)
)


@pytest.fixture(scope="module")
def run_reference(trained_model: TrainedModel) -> tuple[str, str]:  # noqa: F811
    """The trained flow's folder logged as run artifacts: (runs:/<id>/flow, run id)."""
    import mlflow

    from pipeline.tracking.connection import ensure_experiment

    experiment_id = ensure_experiment(trained_model.tracking_uri, "tests")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_artifacts(str(trained_model.directory), artifact_path="flow")
    return f"runs:/{run.info.run_id}/flow", run.info.run_id


@pytest.fixture
def references(trained_model: TrainedModel, run_reference: tuple[str, str]) -> dict:  # noqa: F811
    """Reference kind -> (reference, expected name, expected version)."""
    import mlflow

    mlflow.set_tracking_uri(trained_model.tracking_uri)
    digest = FlowPayload.from_flow(load_flow(trained_model.directory)).digest()
    uri, run_id = run_reference
    return {
        "local": (str(trained_model.directory), "local", digest),
        "run": (uri, f"run-{run_id[:12]}", digest),
        "alias": (f"models:/{MODEL_NAME}@champion", MODEL_NAME, "1"),
        "version": (f"models:/{MODEL_NAME}/1", MODEL_NAME, "1"),
    }


@pytest.mark.parametrize("kind", ["local", "run", "alias", "version"])
def test_every_reference_kind_loads_the_same_weights_under_its_name(
    references: dict,
    trained_model: TrainedModel,  # noqa: F811
    kind: str,
) -> None:
    reference, name, version = references[kind]
    model = resolve_batch_model(reference)
    assert isinstance(model, BatchModel) and model.reference == reference
    assert (model.name, model.version, model.label) == (name, version, f"{name} v{version}")
    assert model.image_shape == (1, 28, 28)
    expected = FlowPayload.from_flow(load_flow(trained_model.directory))
    assert model.payload == expected  # registry, run and folder all hold the trained weights
    assert FlowPayload.from_flow(model.flow) == expected


def test_unknown_reference_says_what_is_expected(references: dict) -> None:
    from pipeline.tracking.registry import ModelNotFound

    with pytest.raises(ModelNotFound, match="expected models:/<name>@<alias>"):
        resolve_batch_model("ftp://models/flow")


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("kind", ["local", "run", "alias"])
def test_scoring_and_sampling_name_the_model_alike(
    references: dict,
    trained_model: TrainedModel,  # noqa: F811
    fashion_mnist_dir: Path,
    tmp_path: Path,
    kind: str,
) -> None:
    from pipeline.batch.sampling import SampleConfig, generate
    from pipeline.batch.scoring.job import ScoreConfig, score

    reference, name, version = references[kind]
    split = prepare_fmnist(fashion_mnist_dir, str(tmp_path / "data"), 32, 32)
    scored = score(
        ScoreConfig(
            model=reference,
            input=split,
            output=str(tmp_path / "scores"),
            tracking_uri=trained_model.tracking_uri,
            actors=1,
            least_likely=0,
            log_to_mlflow=False,
        )
    )
    sampled = generate(
        SampleConfig(
            model=reference,
            output=str(tmp_path / "samples"),
            n=4,
            chunk_size=4,
            grid_images=1,
            grid_temperatures=(0.7,),
            tracking_uri=trained_model.tracking_uri,
            log_to_mlflow=False,
        )
    )
    assert (scored.model_name, scored.model_version) == (name, version)
    assert (sampled.model_name, sampled.model_version) == (name, version)
    assert Path(scored.output) == tmp_path / "scores" / f"model={name}" / f"version={version}"
