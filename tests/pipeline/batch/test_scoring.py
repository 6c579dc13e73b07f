"""Bulk scoring: per-shard Parquet written once, exactly once per key across crashes and reruns,
agreement with training's validation, the OOD score, skips, the registry, S3."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.batch.scoring.job import ScoreConfig, ScoreError, score
from pipeline.batch.scoring.output import (
    OUTPUT_COLUMNS,
    SETTINGS_FILE,
    SKIPPED_COUNT_KEY,
    SKIPPED_KEYS_KEY,
)
from pipeline.model.scores import max_png_bytes
from tests.pipeline.flow_fixtures import (
    MODEL_NAME,
    TrainedModel,
    prepare_array,
    prepare_fmnist,
    trained_model,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.usefixtures("ray_local")

IMAGES, PER_SHARD = 600, 200


@pytest.fixture(scope="module")
def fmnist_split(fashion_mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """600 held-out Fashion-MNIST test images in 3 shards."""
    return prepare_fmnist(
        fashion_mnist_dir, str(tmp_path_factory.mktemp("fmnist") / "data"), IMAGES, PER_SHARD
    )


def config(
    trained: TrainedModel, input: str, output: Path | str, model: str = "", **kwargs
) -> ScoreConfig:
    return ScoreConfig(
        model=model or str(trained.directory),
        input=input,
        output=str(output),
        tracking_uri=trained.tracking_uri,
        batch_size=128,
        actors=1,
        least_likely=8,
        **kwargs,
    )


def parquet_files(prefix: str | Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in Path(prefix).glob("*.parquet")}


@pytest.fixture(scope="module")
def scored(trained_model: TrainedModel, fmnist_split: str, tmp_path_factory) -> tuple:  # noqa: F811
    cfg = config(trained_model, fmnist_split, tmp_path_factory.mktemp("scores"))
    return cfg, score(cfg)


def test_scoring_writes_one_file_per_shard_with_every_key_once(scored: tuple) -> None:
    _, result = scored
    assert result.model_name == "local" and len(result.model_version) == 12
    assert sorted(parquet_files(result.output)) == [f"shard-00000{i}.parquet" for i in range(3)]
    frame = pd.read_parquet(result.output)
    assert list(frame.columns) == list(OUTPUT_COLUMNS)
    assert len(frame) == IMAGES == frame["key"].nunique() == result.images_scored
    for name in ("shard-000000", "shard-000002"):
        part = pd.read_parquet(Path(result.output) / f"{name}.parquet")
        assert set(part["shard"]) == {f"{name}.tar"} and len(part) == PER_SHARD
    assert set(frame["label"]) <= set(range(10))
    assert result.images_skipped == 0
    # The summary beside the outputs, and in MLflow with the model's name and version.
    summary = Path(result.summary_url)
    assert {"summary.json", "bits_per_dim_histogram.png", "least_likely.png"} <= {
        p.name for p in summary.iterdir()
    }
    assert result.p99_bits_per_dim >= result.median_bits_per_dim
    assert abs(result.mean_bits_per_dim - frame["bits_per_dim"].mean()) < 1e-9
    # Median and p99 come from 1e-3-wide bins (bounded memory): within a bin of the order stats.
    ordered = np.sort(frame["bits_per_dim"].to_numpy())
    assert ordered[299] - 1e-3 <= result.median_bits_per_dim <= ordered[300] + 1e-3
    assert ordered[593] - 1e-3 <= result.p99_bits_per_dim <= ordered[594] + 1e-3
    from mlflow.tracking import MlflowClient

    run = MlflowClient(scored[0].tracking_uri).get_run(result.mlflow_run_id)
    assert run.data.tags["model_name"] == "local"
    assert run.data.tags["model_version"] == result.model_version
    assert run.data.metrics["images_scored"] == IMAGES
    # The config as params, one per dotted key, JSON for non-strings.
    params = run.data.params
    assert params["model"] == scored[0].model and params["batch_size"] == "128"
    assert params["read_concurrency"] == "null" and params["storage.endpoint_url"] == "null"


def test_rerun_writes_nothing(scored: tuple) -> None:
    cfg, first = scored
    before = parquet_files(first.output)
    summaries = sorted(p.name for p in (Path(first.output) / "_summary").iterdir())
    again = score(cfg)
    assert again.shards_written == () and again.images_scored == 0
    assert again.shards_already_done == 3 and again.mlflow_run_id is None
    assert parquet_files(first.output) == before  # same files, same mtimes
    assert sorted(p.name for p in (Path(first.output) / "_summary").iterdir()) == summaries


def test_scores_reproduce_training_validation_bits_per_dim(
    scored: tuple,
    trained_model: TrainedModel,  # noqa: F811
    fmnist_split: str,
) -> None:
    from pipeline.data.reader import iter_input
    from pipeline.model.artifact import load_flow
    from pipeline.model.likelihood import keyed_bits_per_dim, keyed_log_prob_levels
    from pipeline.train.step import evaluate_bits_per_dim

    flow = load_flow(trained_model.directory)
    rows = list(iter_input(fmnist_split, shape=(1, 28, 28)))
    keys = [row["key"] for row in rows]
    images = torch.from_numpy(np.stack([row["image"] for row in rows]))
    batches = [(keys[i : i + 100], images[i : i + 100]) for i in range(0, len(keys), 100)]
    mean, count = evaluate_bits_per_dim(flow, batches, seed=0)
    frame = pd.read_parquet(scored[1].output).set_index("key").loc[keys]
    assert count == IMAGES
    assert abs(frame["bits_per_dim"].mean() - mean) < 1e-4
    expected = keyed_bits_per_dim(flow, keys, images, seed=0).double().numpy()
    assert np.abs(frame["bits_per_dim"].to_numpy() - expected).max() < 1e-4
    # log-likelihood in nats is bits/dim in other units: -bpd * D * ln 2.
    dims = 28 * 28
    np.testing.assert_allclose(
        frame["log_likelihood"], -frame["bits_per_dim"] * dims * math.log(2), rtol=1e-9
    )
    # OOD score = bits/dim - PNG bits/dim (PNG at maximum compression of the decoded image) +
    # the final level's bits/dim: its log p(y) share over its dims, plus the 8 bits of the cell.
    first = rows[0]
    png_bits = 8 * len(max_png_bytes(first["image"])) / dims
    assert frame.loc[first["key"], "png_bits_per_dim"] == pytest.approx(png_bits)
    _, levels = keyed_log_prob_levels(flow, keys, images, seed=0)
    last = math.prod(flow.latent_shapes[-1])
    final = -levels[:, -1].double().numpy() / (last * math.log(2)) + 8
    np.testing.assert_allclose(
        frame["ood_score"], frame["bits_per_dim"] - frame["png_bits_per_dim"] + final, atol=1e-4
    )


def test_interrupted_run_then_rerun_scores_every_key_exactly_once(
    trained_model: TrainedModel,  # noqa: F811
    fmnist_split: str,
    tmp_path: Path,
) -> None:
    cfg = config(trained_model, fmnist_split, tmp_path / "out")

    def crash_after_first(shard: str) -> None:
        raise RuntimeError(f"injected crash after {shard}")

    with pytest.raises(RuntimeError, match="injected crash"):
        score(cfg, on_shard_written=crash_after_first)
    prefix = next((tmp_path / "out").glob("model=local/version=*"))
    survived = parquet_files(prefix)
    assert len(survived) == 1  # the crash came before the other shards were complete
    assert not [p for p in prefix.iterdir() if p.name.startswith(".")]  # no temp files left

    result = score(cfg)
    assert len(result.shards_written) == 2 and result.shards_already_done == 1
    after = parquet_files(prefix)
    assert len(after) == 3
    assert all(after[name] == mtime for name, mtime in survived.items())  # not rewritten
    frame = pd.read_parquet(prefix)
    assert len(frame) == IMAGES and frame["key"].nunique() == IMAGES


def reseal(split: Path, shard: str) -> None:
    """Give `shard` the size and sha256 its bytes have now in the manifest, as the tool that
    wrote a shard with a bad image in it would have."""
    path = split / "manifest.json"
    manifest = json.loads(path.read_text())
    data = (split / shard).read_bytes()
    for entry in manifest["shards"]:
        if entry["name"] == shard:
            entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    path.write_text(json.dumps(manifest))


def break_png(shard: Path, index: int) -> str:
    """Overwrite 16 bytes in the middle of the shard's `index`-th PNG (same size: its CRC
    breaks); returns its key."""
    with tarfile.open(shard) as archive:
        member = [m for m in archive.getmembers() if m.name.endswith(".png")][index]
    with open(shard, "r+b") as file:
        file.seek(member.offset_data + member.size // 2)
        file.write(b"\x00" * 16)
    return member.name.split(".")[0]


def test_unreadable_image_is_skipped_counted_and_left_out(
    trained_model: TrainedModel,  # noqa: F811
    fmnist_split: str,
    tmp_path: Path,
) -> None:
    split = tmp_path / "test"
    shutil.copytree(fmnist_split, split)
    bad_key = break_png(split / "shard-000001.tar", 5)
    reseal(split, "shard-000001.tar")  # a whole shard that holds a bad image

    result = score(config(trained_model, str(split), tmp_path / "out", on_error="skip"))
    assert result.images_skipped == 1 and result.images_scored == IMAGES - 1
    assert result.status == "complete" and result.shards_left_out == ()
    frame = pd.read_parquet(result.output)
    assert len(frame) == IMAGES - 1 == frame["key"].nunique()
    assert bad_key not in set(frame["key"])
    assert len(parquet_files(result.output)) == 3
    # The shard written short says which image it lacks, in its Parquet metadata.
    metadata = pq.read_schema(Path(result.output) / "shard-000001.parquet").metadata
    assert metadata[SKIPPED_COUNT_KEY.encode()] == b"1"
    assert json.loads(metadata[SKIPPED_KEYS_KEY.encode()]) == [bad_key]


def test_shards_not_read_whole_get_no_file_and_are_listed_everywhere_and_rerun(
    trained_model: TrainedModel,  # noqa: F811
    fmnist_split: str,
    tmp_path: Path,
) -> None:
    split = tmp_path / "test"
    shutil.copytree(fmnist_split, split)
    original = (split / "shard-000000.tar").read_bytes()
    (split / "shard-000000.tar").write_bytes(original[: -20 * 1024])  # an interrupted copy
    break_png(split / "shard-000002.tar", 7)  # one byte changed: its sha256 differs

    cfg = config(trained_model, str(split), tmp_path / "out", on_error="skip")
    result = score(cfg)
    assert result.status == "partial" and result.shards_written == ("shard-000001.tar",)
    assert sorted(parquet_files(result.output)) == ["shard-000001.parquet"]
    assert len(pd.read_parquet(result.output)) == PER_SHARD == result.images_scored
    reasons = dict(result.shards_left_out)
    assert sorted(reasons) == ["shard-000000.tar", "shard-000002.tar"]
    assert "bytes, manifest says" in reasons["shard-000000.tar"]
    assert "sha256" in reasons["shard-000002.tar"]
    assert result.images_left_out == 2 * PER_SHARD and result.images_skipped == 0
    assert "2 shards (400 images) left out" in result.line()
    summary = json.loads((Path(result.summary_url) / "summary.json").read_text())
    assert summary["status"] == "partial"
    assert summary["left_out"] == [
        {"shard": name, "reason": reasons[name]} for name in sorted(reasons)
    ]
    from mlflow.tracking import MlflowClient

    run = MlflowClient(cfg.tracking_uri).get_run(result.mlflow_run_id)
    assert run.data.metrics["shards_left_out"] == 2
    assert run.data.tags["flowray.status"] == "partial"
    assert run.data.tags["flowray.left_out"].splitlines() == [
        f"{name}: {reasons[name]}" for name in sorted(reasons)
    ]

    # Repaired, a rerun scores exactly the shards left out.
    (split / "shard-000000.tar").write_bytes(original)
    again = score(cfg)
    assert again.shards_written == ("shard-000000.tar",) and again.status == "partial"
    assert list(dict(again.shards_left_out)) == ["shard-000002.tar"]
    frame = pd.read_parquet(again.output)
    assert len(frame) == 2 * PER_SHARD == frame["key"].nunique()


def test_a_split_with_no_readable_shard_fails(
    trained_model: TrainedModel,  # noqa: F811
    fmnist_split: str,
    tmp_path: Path,
) -> None:
    split = tmp_path / "test"
    shutil.copytree(fmnist_split, split)
    for shard in sorted(split.glob("shard-*.tar")):
        break_png(shard, 0)
    result = score(config(trained_model, str(split), tmp_path / "out", on_error="skip"))
    assert result.status == "failed" and result.shards_written == ()
    assert [s for s, _ in result.shards_left_out] == [f"shard-00000{i}.tar" for i in range(3)]
    assert not parquet_files(result.output) and result.images_scored == 0
    assert not result.line().startswith("nothing to score")


def test_a_recreated_model_reusing_its_version_number_is_refused(
    trained_model: TrainedModel,  # noqa: F811
    fmnist_split: str,
    tmp_path: Path,
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.model.artifact import load_flow
    from pipeline.tracking.connection import ensure_experiment
    from pipeline.tracking.registry import log_flow_model, register_flow

    name, client = "fmnist-recreated", MlflowClient(trained_model.tracking_uri)
    mlflow.set_tracking_uri(trained_model.tracking_uri)
    register_flow(f"models:/{MODEL_NAME}/1", name, 4.0)
    cfg = config(trained_model, fmnist_split, tmp_path / "out", model=f"models:/{name}/1")
    first = score(cfg)
    recorded = json.loads((Path(first.output) / SETTINGS_FILE).read_text())
    weights = (trained_model.directory / "model.safetensors").read_bytes()
    assert recorded["weights_sha256"] == hashlib.sha256(weights).hexdigest()

    # The name deleted and registered again with other weights: version 1 again, same folder.
    client.delete_registered_model(name)
    flow = load_flow(trained_model.directory)
    with torch.no_grad():
        next(flow.parameters()).add_(0.01)
    with mlflow.start_run(experiment_id=ensure_experiment(trained_model.tracking_uri, "tests")):
        register_flow(log_flow_model(flow).model_uri, name, 4.0)
    (Path(first.output) / "shard-000000.parquet").unlink()  # one shard still to do
    with pytest.raises(ScoreError) as error:
        score(cfg)
    message = str(error.value)
    assert f"other settings (weights_sha256: '{recorded['weights_sha256']}'; this run: '" in message
    assert not (Path(first.output) / "shard-000000.parquet").exists()


def test_shape_mismatch_stops_before_any_work(
    trained_model: TrainedModel,  # noqa: F811
    tmp_path: Path,
) -> None:
    images = np.random.default_rng(0).integers(0, 256, (20, 32, 32), dtype=np.uint8)
    split = prepare_array(images, tmp_path / "big", per_shard=10)
    with pytest.raises(ScoreError) as error:
        score(config(trained_model, split, tmp_path / "out"))
    assert "[1, 32, 32]" in str(error.value) and "[1, 28, 28]" in str(error.value)
    assert not list((tmp_path / "out").rglob("*.parquet"))


def test_registry_alias_scores_noise_as_less_likely_than_fashion_mnist(
    scored: tuple,
    trained_model: TrainedModel,  # noqa: F811
    tmp_path: Path,
) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (300, 28, 28), dtype=np.uint8)
    split = prepare_array(noise, tmp_path / "noise", per_shard=150)
    result = score(
        config(trained_model, split, tmp_path / "out", model=f"models:/{MODEL_NAME}@champion")
    )
    assert (result.model_name, result.model_version) == (MODEL_NAME, "1")
    assert Path(result.output) == tmp_path / "out" / f"model={MODEL_NAME}" / "version=1"
    noise_bits = pd.read_parquet(result.output)["bits_per_dim"]
    fmnist_bits = pd.read_parquet(scored[1].output)["bits_per_dim"]
    # Uniform noise is far less likely under a model of clothes than held-out clothes are.
    assert noise_bits.mean() > fmnist_bits.mean() + 2.0
    assert noise_bits.min() > fmnist_bits.median()


def test_unknown_alias_lists_the_registered_aliases(
    trained_model: TrainedModel,  # noqa: F811
    fmnist_split: str,
    tmp_path: Path,
) -> None:
    from pipeline.tracking.registry import ModelNotFound

    with pytest.raises(ModelNotFound) as error:
        score(config(trained_model, fmnist_split, tmp_path, model=f"models:/{MODEL_NAME}@nope"))
    assert "@champion -> v1" in str(error.value) and "@candidate -> v1" in str(error.value)
    assert not list(tmp_path.rglob("*.parquet"))


def test_s3_input_and_output(
    trained_model: TrainedModel,  # noqa: F811
    fashion_mnist_dir: Path,
    s3,
) -> None:
    import pyarrow.dataset as pads

    from pipeline.storage import arrow_filesystem, fsspec_filesystem

    split = prepare_fmnist(fashion_mnist_dir, f"{s3.url}/data", 300, 150, s3.storage)
    cfg = ScoreConfig(
        model=str(trained_model.directory),
        input=split,
        output=f"{s3.url}/scores",
        storage=s3.storage,
        tracking_uri=trained_model.tracking_uri,
        actors=1,
        log_to_mlflow=False,
    )
    result = score(cfg)
    assert result.output.startswith(f"{s3.url}/scores/model=local/version=")
    filesystem, path = arrow_filesystem(result.output, s3.storage)
    table = pads.dataset(path, filesystem=filesystem, format="parquet").to_table()
    assert table.num_rows == 300 and len(set(table.column("key").to_pylist())) == 300

    fs, path = fsspec_filesystem(result.output, s3.storage)
    etags = {e["name"]: e["ETag"] for e in fs.ls(path, detail=True) if e["type"] == "file"}
    again = score(cfg)
    assert again.shards_written == () and again.shards_already_done == 2
    assert {e["name"]: e["ETag"] for e in fs.ls(path, detail=True) if e["type"] == "file"} == etags


def test_the_pipeline_bounds_its_object_store_buffer_for_this_job_only(
    trained_model: TrainedModel,  # noqa: F811
    fmnist_split: str,
    tmp_path: Path,
) -> None:
    # Unbounded, Ray Data let the readers run ahead of the actors until half the object store was
    # full: a 1M-image run buffered most of its input (docs/benchmarks.md, scaling).
    from ray.data import DataContext

    from pipeline.batch.resolve import resolve_batch_model
    from pipeline.batch.scoring.actors import MIN_BUFFER_BYTES, buffer_limit, build_pipeline
    from pipeline.data.inputs import resolve_input
    from pipeline.data.tally import SkipTally

    cfg = dataclasses.replace(config(trained_model, fmnist_split, tmp_path), actors=2)
    plan = resolve_input(fmnist_split)
    payload = resolve_batch_model(cfg.model).payload
    shards = [ref.url for ref in plan.shards]
    dataset = build_pipeline(cfg, payload, plan, shards, SkipTally.shared(), (1, 28, 28))
    # 8 batches x 2 actors x 128 images x 784 bytes is 1.6 MB: the 64 MB floor holds.
    assert dataset.context.execution_options.resource_limits.object_store_memory == MIN_BUFFER_BYTES
    # GPU-sized batches of 3x32x32 (5,461 images, 16.8 MB) on 4 actors: 8 batches each.
    assert buffer_limit(4, 5461, (3, 32, 32)) == 8 * 4 * 5461 * 3072
    # The bound is the dataset's own: the process's DataContext stays unbounded.
    assert (
        DataContext.get_current().execution_options.resource_limits.object_store_memory == math.inf
    )
