"""Logging and registering flows in MLflow: what a logged model ships (flowmodel and the loading
part of pipeline, nothing else), that it loads and predicts in a fresh process from its own code,
its signature and input example, the version tags, registration through mlflow.register_model,
the champion decisions and their wording, that a version without a finite validation bits/dim is
never registered nor promoted, that a name holds one image shape, and that models in the flat
pipeline/ layout of older flowray versions still resolve."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from flowmodel import Flow, FlowConfig, build_flow
from pipeline.model.artifact import save_flow
from pipeline.model.likelihood import keyed_bits_per_dim
from pipeline.model.pyfunc import as_uint8_images, content_key
from pipeline.tracking.connection import ensure_experiment
from pipeline.tracking.registry import (
    SHIPPED_PIPELINE,
    ModelNotFound,
    Promotion,
    RegistrationError,
    ShapeMismatch,
    example_images,
    log_flow_model,
    promote,
    register_flow,
    resolve_model,
)

SHAPE = (3, 8, 8)
SEED = 7


@pytest.fixture
def experiment(tmp_path: Path) -> str:
    """An empty SQLite MLflow store in tmp_path, set as the tracking URI; its experiment id."""
    return ensure_experiment(f"sqlite:///{tmp_path / 'mlflow.db'}", "registry-tests")


def tiny_flow() -> Flow:
    """A small RGB flow with data-initialized ActNorm, so its weights are not the defaults."""
    torch.manual_seed(0)
    flow = build_flow(FlowConfig(image_shape=SHAPE, levels=2, steps_per_level=1, hidden_channels=8))
    generator = torch.Generator().manual_seed(0)
    flow.initialize(torch.randint(0, 256, (32, *SHAPE), dtype=torch.uint8, generator=generator))
    return flow.eval()


def images(count: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (count, *SHAPE), dtype=np.uint8)


def log_and_register(flow: Flow, experiment: str, name: str) -> str:
    with mlflow.start_run(experiment_id=experiment) as run:
        info = log_flow_model(flow)
        register_flow(info.model_uri, name, 4.25, run.info.run_id)
    return f"models:/{name}/1"


def code_files(model_dir: Path) -> set[str]:
    code = model_dir / "code"
    return {p.relative_to(code).as_posix() for p in code.rglob("*") if p.is_file()}


def imported_modules(source: Path) -> set[str]:
    """Absolute module names a Python file imports (`import a.b`, `from a.b import c`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_a_logged_flow_ships_flowmodel_and_only_the_loading_part_of_pipeline(
    experiment: str,
) -> None:
    uri = log_and_register(tiny_flow(), experiment, "shipped")
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    files = code_files(model_dir)

    assert {f.split("/")[0] for f in files} == {"flowmodel", "pipeline"}
    assert {f.split("/")[1] for f in files if f.startswith("pipeline/")} == set(SHIPPED_PIPELINE)
    for left_out in ("bench", "train", "batch", "data", "tracking", "storage.py", "submission.py"):
        assert not (model_dir / "code" / "pipeline" / left_out).exists(), left_out
    assert "pipeline/model/pyfunc.py" in files and "flowmodel/flow.py" in files
    assert not any("__pycache__" in f for f in files)
    # Every flowray module the shipped code imports is shipped too.
    code = model_dir / "code"
    for path in code.rglob("*.py"):
        for module in imported_modules(path):
            if module.split(".")[0] in ("flowmodel", "pipeline"):
                target = code / module.replace(".", "/")
                found = target.with_suffix(".py").exists() or (target / "__init__.py").exists()
                assert found, f"{path.relative_to(code)} imports {module}, which is not shipped"


def test_a_registered_version_is_tagged_with_its_bits_per_dim_and_image_shape(
    experiment: str,
) -> None:
    log_and_register(tiny_flow(), experiment, "tagged")
    tags = MlflowClient().get_model_version("tagged", "1").tags
    assert tags["val_bits_per_dim"] == "4.250000"
    assert tags["image_shape"] == "3x8x8"


# Run in a fresh interpreter: the model's own code must be enough. The test's virtualenv has
# flowray installed in editable mode, whose import hook would quietly supply any pipeline module
# the model lacks; a serving host has no flowray at all, so the hook is removed first.
LOAD_AND_PREDICT = """
import importlib.util, json, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
import mlflow
import numpy as np

uri, images_file, keys, seed = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
model = mlflow.pyfunc.load_model(uri)
frame = model.predict(np.load(images_file), params={"seed": seed, "keys": keys})
import pipeline
print(json.dumps({
    "bits": frame["bits_per_dim"].tolist(),
    "keys": frame["key"].tolist(),
    "pipeline": pipeline.__file__,
    "train_importable": importlib.util.find_spec("pipeline.train") is not None,
}))
"""


def test_a_logged_flow_loads_in_a_fresh_process_from_its_own_code(
    experiment: str, tmp_path: Path
) -> None:
    flow = tiny_flow()
    uri = log_and_register(flow, experiment, "fresh")
    batch = images(5)
    np.save(tmp_path / "images.npy", batch)
    keys = [f"img-{i}" for i in range(len(batch))]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()

    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, uri, "images.npy", json.dumps(keys), str(SEED)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])

    assert "/code/pipeline/" in loaded["pipeline"], loaded["pipeline"]
    assert not loaded["train_importable"]
    expected = keyed_bits_per_dim(flow, keys, torch.from_numpy(batch), SEED).double()
    assert loaded["keys"] == keys
    # SEED is not predict's default (0): equal bits mean the seed param reached the model.
    assert loaded["bits"] == pytest.approx(expected.tolist(), abs=1e-6)


def old_layout_model(flow: Flow, folder: Path) -> Path:
    """A model directory as `log_flow_model` wrote it before pipeline/ moved into subpackages:
    code/pipeline/ held the flat modules (flow_pyfunc.py, pyfunc_entry.py, model_store.py, ...),
    and artifacts/flow held model.safetensors + flow_config.json, as it still does."""
    save_flow(flow, folder / "artifacts" / "flow")
    old_code = folder / "code" / "pipeline"
    old_code.mkdir(parents=True)
    (old_code / "__init__.py").write_text("")
    entry = "import mlflow.models\nfrom pipeline.flow_pyfunc import FlowPyfunc\n"
    (old_code / "pyfunc_entry.py").write_text(entry + "mlflow.models.set_model(FlowPyfunc())\n")
    (old_code / "flow_pyfunc.py").write_text("from pipeline.model_store import load_flow\n")
    (folder / "pyfunc_entry.py").write_text((old_code / "pyfunc_entry.py").read_text())
    flavor = {
        "artifacts": {"flow": {"path": "artifacts/flow"}},
        "code": "code",
        "loader_module": "mlflow.pyfunc.loaders.code_model",
        "model_code_path": "pipeline/pyfunc_entry.py",
    }
    mlmodel = {
        "flavors": {"python_function": flavor},
        "metadata": {"flow_config": json.dumps(flow.config.to_dict())},
    }
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return folder


def test_a_model_logged_before_the_move_still_resolves_by_alias_and_version(
    experiment: str, tmp_path: Path
) -> None:
    flow = tiny_flow()
    model = mlflow.initialize_logged_model(name="model", experiment_id=experiment)
    client = MlflowClient()
    client.log_model_artifacts(model.model_id, str(old_layout_model(flow, tmp_path / "old")))
    client.finalize_logged_model(model.model_id, "READY")
    with mlflow.start_run(experiment_id=experiment) as run:
        register_flow(f"models:/{model.model_id}", "old-layout", 4.0, run.info.run_id)

    for reference in ("models:/old-layout@champion", "models:/old-layout/1"):
        resolved = resolve_model(reference)
        assert (resolved.name, resolved.version) == ("old-layout", "1")
        batch, keys = torch.from_numpy(images(4)), ["a", "b", "c", "d"]
        assert torch.equal(
            keyed_bits_per_dim(resolved.flow, keys, batch, SEED),
            keyed_bits_per_dim(flow, keys, batch, SEED),
        )
    assert client.get_model_version("old-layout", "1").tags["image_shape"] == "3x8x8"


def test_an_unknown_alias_is_a_user_error_that_lists_the_aliases(experiment: str) -> None:
    log_and_register(tiny_flow(), experiment, "aliased")
    with pytest.raises(ModelNotFound) as error:
        resolve_model("models:/aliased@best")
    assert "'aliased' has aliases @candidate -> v1, @champion -> v1" in str(error.value)
    assert "flowray models list" in error.value.hint
    assert isinstance(error.value, LookupError)


def test_a_logged_flow_has_a_uint8_tensor_signature_and_an_input_example_that_serves(
    experiment: str,
) -> None:
    flow = tiny_flow()
    with mlflow.start_run(experiment_id=experiment):
        info = log_flow_model(flow)
    assert json.loads(info.signature.inputs.to_json()) == [
        {"type": "tensor", "tensor-spec": {"dtype": "uint8", "shape": [-1, *SHAPE]}}
    ]
    assert {p.name: p.default for p in info.signature.params.params} == {
        "keys": [],
        "seed": 0,
        "draws": 1,
    }
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri))
    assert info.metadata["noise_scheme"] == "splitmix64-v2"  # scores depend on it
    serving = json.loads((model_dir / "serving_input_example.json").read_text())
    example = np.asarray(serving["inputs"])
    assert example.shape == (2, *SHAPE)
    assert np.array_equal(example, example_images(flow))  # the flow's own seeded samples

    frame = mlflow.pyfunc.load_model(info.model_uri).predict(example.astype(np.uint8))
    expected_keys = [content_key(image) for image in example.astype(np.uint8)]
    assert frame["key"].tolist() == expected_keys
    expected = keyed_bits_per_dim(flow, expected_keys, torch.from_numpy(example).byte(), 0)
    assert frame["bits_per_dim"].tolist() == pytest.approx(expected.tolist(), abs=1e-6)


def test_without_keys_an_image_scores_the_same_at_any_position_in_any_batch(
    experiment: str,
) -> None:
    with mlflow.start_run(experiment_id=experiment):
        info = log_flow_model(tiny_flow())
    model = mlflow.pyfunc.load_model(info.model_uri)
    batch = images(3)
    forward = model.predict(batch)
    backward = model.predict(batch[::-1].copy())
    alone = model.predict(batch[1:2])
    assert forward["bits_per_dim"].tolist() == backward["bits_per_dim"].tolist()[::-1]
    assert alone["bits_per_dim"][0] == forward["bits_per_dim"][1]
    with_keys = model.predict(batch, params={"keys": ["a", "b", "c"], "seed": SEED})
    assert with_keys["key"].tolist() == ["a", "b", "c"]
    assert with_keys["bits_per_dim"].tolist() != forward["bits_per_dim"].tolist()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.full((2, *SHAPE), 7, np.int64), None),
        (np.full((2, *SHAPE), 255, np.uint16), None),
        (
            np.full((2, *SHAPE), 0.5),
            "expected integers 0..255 shaped [B, 3, 8, 8], found dtype float64 [2, 3, 8, 8]",
        ),
        (
            np.full((2, *SHAPE), 256, np.int64),
            "expected values in 0..255, found values from 256 to 256",
        ),
        (
            np.full((2, *SHAPE), -1, np.int32),
            "expected values in 0..255, found values from -1 to -1",
        ),
        (
            np.zeros((2, 1, 8, 8), np.uint8),
            "expected shape [B, 3, 8, 8] (B >= 1), found [2, 1, 8, 8]",
        ),
        (
            np.zeros((0, *SHAPE), np.uint8),
            "expected shape [B, 3, 8, 8] (B >= 1), found [0, 3, 8, 8]",
        ),
        (np.full((2, *SHAPE), True), "found dtype bool"),
    ],
)
def test_images_of_any_integer_type_within_0_255_are_accepted_and_others_refused(
    values: np.ndarray, message: str | None
) -> None:
    if message is None:
        converted = as_uint8_images(values, SHAPE)
        assert converted.dtype == np.uint8 and np.array_equal(converted, values)
        return
    with pytest.raises(ValueError) as error:
        as_uint8_images(values, SHAPE)
    assert message in str(error.value)


def test_predict_refuses_a_bad_batch_with_a_400_error_saying_expected_and_found(
    experiment: str,
) -> None:
    from mlflow.exceptions import MlflowException

    with mlflow.start_run(experiment_id=experiment):
        info = log_flow_model(tiny_flow())
    python_model = mlflow.pyfunc.load_model(info.model_uri).unwrap_python_model()
    with pytest.raises(MlflowException) as error:
        python_model.predict(None, np.full((1, *SHAPE), 300), params={})
    assert error.value.get_http_status_code() == 400
    assert "expected values in 0..255, found values from 300 to 300" in error.value.message
    with pytest.raises(MlflowException, match="keys: expected one per image \\(1\\), found 2"):
        python_model.predict(None, images(1), params={"keys": ["a", "b"]})


def test_registration_goes_through_mlflow_and_links_the_run_that_logged_the_model(
    experiment: str,
) -> None:
    with mlflow.start_run(experiment_id=experiment) as run:
        info = log_flow_model(tiny_flow())
        first = register_flow(info.model_uri, "linked", 4.0)
    version = MlflowClient().get_model_version("linked", "1")
    assert (first.version, first.promoted, first.previous) == ("1", True, "")
    assert version.run_id == run.info.run_id
    assert info.model_id in version.source  # the LoggedModel, not a copy of its files
    assert aliases("linked") == {"candidate": "1", "champion": "1"}


def aliases(name: str) -> dict[str, str]:
    return {a: str(v) for a, v in MlflowClient().get_registered_model(name).aliases.items()}


def register_logged(experiment: str, name: str, bits: float) -> Promotion:
    with mlflow.start_run(experiment_id=experiment):
        info = log_flow_model(tiny_flow())
        return register_flow(info.model_uri, name, bits)


def test_the_champion_decision_says_what_happened(experiment: str) -> None:
    assert register_logged(experiment, "decided", 3.45).reason == (
        "now champion (no previous champion)"
    )
    better = register_logged(experiment, "decided", 3.41)
    assert (better.version, better.promoted, better.previous) == ("2", True, "1")
    assert better.reason == "now champion (3.4100 < v1's 3.4500)"
    worse = register_logged(experiment, "decided", 3.5)
    assert (worse.version, worse.promoted) == ("3", False)
    assert worse.reason == "champion stays v2 (3.4100 < 3.5000)"
    client = MlflowClient()
    assert aliases("decided") == {"candidate": "3", "champion": "2"}
    assert client.get_model_version("decided", "3").tags["promotion"] == worse.reason
    forced = promote("decided", "3", force=True)
    assert forced.reason == "now champion, forced (3.5000 >= v2's 3.4100)"
    assert promote("decided", "3").reason == "already champion"


@pytest.mark.parametrize("bits", [math.nan, None, "", math.inf])
def test_a_flow_without_a_finite_validation_figure_is_never_registered(
    experiment: str, bits: object
) -> None:
    with pytest.raises(RegistrationError) as error:
        register_logged(experiment, "unscored", bits)  # type: ignore[arg-type]
    assert f"expected a finite validation bits/dim, found {bits!r}" in str(error.value)
    assert "nothing was registered" in str(error.value)
    assert "data.validation" in error.value.hint
    assert MlflowClient().search_registered_models(filter_string="name='unscored'") == []


def test_a_version_without_a_finite_figure_never_becomes_champion_even_forced(
    experiment: str,
) -> None:
    register_logged(experiment, "tagged-nan", 4.0)
    register_logged(experiment, "tagged-nan", 4.5)
    client = MlflowClient()
    client.set_model_version_tag("tagged-nan", "2", "val_bits_per_dim", "nan")
    with pytest.raises(RegistrationError, match="v2 cannot become champion: expected a finite"):
        promote("tagged-nan", "2", force=True)
    assert aliases("tagged-nan")["champion"] == "1"
    # A champion without a figure (an older flowray's version) gives way.
    client.delete_model_version_tag("tagged-nan", "1", "val_bits_per_dim")
    client.set_model_version_tag("tagged-nan", "2", "val_bits_per_dim", "4.500000")
    assert promote("tagged-nan", "2").reason == "now champion (v1 has no validation bits/dim)"


def test_a_version_of_another_image_shape_is_refused_naming_both_shapes_and_the_fix(
    experiment: str,
) -> None:
    register_logged(experiment, "shaped", 4.0)  # 3x8x8
    torch.manual_seed(0)
    grey = build_flow(FlowConfig(image_shape=(1, 8, 8), levels=2, steps_per_level=1))
    grey.initialize(torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8))
    with mlflow.start_run(experiment_id=experiment):
        info = log_flow_model(grey.eval())
    with pytest.raises(ShapeMismatch) as error:
        register_flow(info.model_uri, "shaped", 3.0)  # better, but of another shape
    assert "expected image shape 3x8x8 (the shape of shaped v1), found 1x8x8" in str(error.value)
    assert "mlflow.registered_model" in error.value.hint
    client = MlflowClient()
    assert [str(v.version) for v in client.search_model_versions("name='shaped'")] == ["1"]
    assert aliases("shaped") == {"candidate": "1", "champion": "1"}
    # Under a new name it registers; a version of another shape slipped in around register_flow
    # never takes the alias, even forced.
    assert register_flow(info.model_uri, "shaped-grey", 3.0).version == "1"
    tags = {"val_bits_per_dim": "3.000000", "image_shape": "1x8x8"}
    assert str(mlflow.register_model(info.model_uri, "shaped", tags=tags).version) == "2"
    with pytest.raises(ShapeMismatch, match="expected image shape 3x8x8 .* found 1x8x8"):
        promote("shaped", "2", force=True)
    assert aliases("shaped")["champion"] == "1"
