"""Training on foreign WebDataset shards in place (issue 13): `data.train` and `data.validation`
take any input `resolve_input` accepts. The shards are JPEGs of mixed sizes written by
webdataset's ShardWriter (tests/pipeline/data/foreign_shards.py), fitted to the model's shape
while reading; preflight names what it expected when a spec names nothing readable."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pipeline.storage import join_url
from pipeline.train.config import TrainConfig
from pipeline.train.driver import PreflightError, image_count, preflight, train
from tests.pipeline.data.foreign_shards import make_photos, upload, write_shards

SHAPE = [3, 16, 16]


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 JPEG photos of mixed sizes in shards 000000..000003.tar (10 each)."""
    folder = tmp_path_factory.mktemp("foreign") / "photos"
    write_shards(folder, make_photos(40), per_shard=10)
    return folder


def config_for(train_spec: str, validation_spec: str, tmp_path: Path, **extra: Any) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "model": {
                "image_shape": SHAPE,
                "levels": 2,
                "steps_per_level": 1,
                "hidden_channels": 8,
            },
            "data": {"train": train_spec, "validation": validation_spec, "validation_limit": 16},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1},
            "run": {"name": "foreign", "storage_path": str(tmp_path / "runs")},
            "mlflow": {
                "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                "registered_model": "foreign-flow",
            },
            "workdir": str(tmp_path),
            "batch_size": 8,
            "init_images": 16,
            "max_steps": 4,
            "eval_every": 4,
            "checkpoint_every": 4,
            "log_every": 2,
            "eval_batch_size": 16,
            **extra,
        }
    )


def test_preflight_resolves_a_pattern_a_prefix_and_a_list_of_foreign_shards(
    photos_dir: Path, tmp_path: Path
) -> None:
    listing = tmp_path / "shards.txt"
    listing.write_text("# two shards\n000000.tar\n000001.tar\n")
    (tmp_path / "000000.tar").write_bytes((photos_dir / "000000.tar").read_bytes())
    (tmp_path / "000001.tar").write_bytes((photos_dir / "000001.tar").read_bytes())
    pattern = f"{photos_dir}/{{000000..000003}}.tar"
    plans = preflight(config_for(pattern, str(photos_dir), tmp_path), local_ray=True)
    assert [len(plans[r].shards) for r in ("train", "validation")] == [4, 4]
    assert image_count(plans["train"]) is None  # counted while reading
    plans = preflight(config_for(str(listing), pattern, tmp_path), local_ray=True)
    assert [ref.name for ref in plans["train"].shards] == ["000000.tar", "000001.tar"]


def test_preflight_names_what_it_expected_for_a_spec_with_no_data(
    photos_dir: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("no shards here")
    with pytest.raises(
        PreflightError, match=r"data.train: expected a prepared split .* no data at"
    ):
        preflight(config_for(str(empty), str(photos_dir), tmp_path), local_ray=True)
    # A pattern with shards missing: refused under fail, naming one.
    pattern = f"{photos_dir}/{{000000..000005}}.tar"
    with pytest.raises(PreflightError, match=r"2 shard\(s\) of the pattern or list do not exist"):
        config = config_for(pattern, str(photos_dir), tmp_path)
        preflight(replace(config, data=replace(config.data, on_error="fail")), local_ray=True)


def test_a_tiny_model_trains_and_validates_on_foreign_jpeg_shards(
    ray_local: None, photos_dir: Path, tmp_path: Path
) -> None:
    pattern = f"{photos_dir}/{{000000..000003}}.tar"
    result = train(config_for(pattern, str(photos_dir), tmp_path))
    assert result.steps == 4
    assert math.isfinite(result.val_bits_per_dim) and 0 < result.val_bits_per_dim < 9
    assert result.model_version == "1"


def test_preflight_and_validation_images_on_s3_foreign_shards(
    s3: Any, photos_dir: Path, tmp_path: Path
) -> None:
    prefix = join_url(s3.url, "photos")
    upload(sorted(photos_dir.glob("*.tar")), prefix, s3.storage)
    config = config_for(
        join_url(prefix, "{000000..000003}.tar"),
        prefix,
        tmp_path,
        storage={"endpoint_url": s3.storage.endpoint_url},
    )
    plans = preflight(config, local_ray=True)
    assert len(plans["train"].shards) == 4 and plans["train"].shards[0].version.startswith("etag:")
    from pipeline.train.worker import _init_batch, _validation_batches

    init = _init_batch(config)
    assert tuple(init.shape) == (16, *SHAPE) and init.dtype.is_floating_point is False
    keys = [k for batch_keys, _ in _validation_batches(config) for k in batch_keys]
    assert len(keys) == 16 and len(set(keys)) == 16
