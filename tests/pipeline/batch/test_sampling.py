"""Sampling: same seed, same PNG bytes whatever the task count; output readable as a split."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.batch.sampling import SampleConfig, SampleError, generate
from tests.pipeline.flow_fixtures import (
    TrainedModel,
    trained_model,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.usefixtures("ray_local")


def config(model: TrainedModel, output: Path, **kwargs) -> SampleConfig:
    values = dict(n=70, chunk_size=16, shard_samples=50, grid_images=4, log_to_mlflow=False)
    values.update(kwargs)
    return SampleConfig(
        model=str(model.directory), output=str(output), tracking_uri=model.tracking_uri, **values
    )


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def test_same_seed_gives_identical_png_shards_whatever_the_task_count(
    trained_model: TrainedModel,  # noqa: F811
    tmp_path: Path,
) -> None:
    from pipeline.data.reader import iter_input
    from pipeline.data.shards import load_manifest

    one = generate(config(trained_model, tmp_path / "one", tasks=1))
    three = generate(config(trained_model, tmp_path / "three", tasks=0))  # auto: 2 per CPU
    other_seed = generate(config(trained_model, tmp_path / "seed1", tasks=2, seed=1))
    assert one.shards == three.shards == 2 and one.images == 70
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "three")
    assert shard_bytes(tmp_path / "one") != shard_bytes(tmp_path / "seed1")
    assert other_seed.written

    # The output is a split: the reader decodes 70 images of the model's shape, keys in order.
    manifest = load_manifest(str(tmp_path / "one"))
    assert manifest.count == 70 and tuple(manifest.shape) == (1, 28, 28)
    rows = list(iter_input(str(tmp_path / "one"), shape=(1, 28, 28)))
    assert [r["key"] for r in rows] == [f"samples-{i:08d}" for i in range(70)]
    assert len({r["image"].tobytes() for r in rows}) == 70  # distinct draws
    assert (tmp_path / "one" / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_writes_nothing_and_other_settings_are_refused(
    trained_model: TrainedModel,  # noqa: F811
    tmp_path: Path,
) -> None:
    first = generate(config(trained_model, tmp_path / "out", n=20, tasks=2))
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    again = generate(config(trained_model, tmp_path / "out", n=20, tasks=1))
    assert first.written and not again.written
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == mtimes
    with pytest.raises(SampleError, match="other settings"):
        generate(config(trained_model, tmp_path / "out", n=20, temperature=1.0))


def test_sampling_run_is_logged_with_the_model_version(
    trained_model: TrainedModel,  # noqa: F811
    tmp_path: Path,
) -> None:
    from mlflow.tracking import MlflowClient

    result = generate(
        SampleConfig(
            model="models:/fmnist-test@champion",
            output=str(tmp_path / "out"),
            n=8,
            chunk_size=8,
            grid_images=4,
            tracking_uri=trained_model.tracking_uri,
        )
    )
    run = MlflowClient(trained_model.tracking_uri).get_run(result.mlflow_run_id)
    assert (run.data.tags["model_name"], run.data.tags["model_version"]) == ("fmnist-test", "1")
    assert run.data.metrics["images"] == 8
    # The config as params, one per key, JSON for non-strings; storage holds no results: left out.
    params = run.data.params
    assert params["model"] == "models:/fmnist-test@champion" and params["n"] == "8"
    assert params["grid_temperatures"] == "[0.5, 0.7, 0.85, 1.0]"
    assert params["tracking_uri"] == trained_model.tracking_uri
    assert not [key for key in params if key.startswith("storage")]
    artifacts = [
        a.path for a in MlflowClient(trained_model.tracking_uri).list_artifacts(run.info.run_id)
    ]
    assert "grid.png" in artifacts
