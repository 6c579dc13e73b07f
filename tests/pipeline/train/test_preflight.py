"""`flowray train`'s preflight on prepared splits, without Ray: a validation split with no image
that can be read is refused before training starts (registration would refuse its NaN at the
end), and under skip a damaged shard no longer refuses the whole split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.data.shards import prepare
from pipeline.data.sources import open_source
from pipeline.train.config import TrainConfig
from pipeline.train.driver import PreflightError, image_count, preflight


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("shards")
    prepare(open_source(f"idx:{fashion_mnist_dir}"), str(out), shard_samples=300, limit=900)
    return out


def config_for(data: Path, on_error: str) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "data": {"train": f"{data}/train", "validation": f"{data}/test", "on_error": on_error},
            "scaling": {"num_workers": 1},
            "batch_size": 32,
        }
    )


def damaged_copy(shards: Path, tmp_path: Path, split: str, keep: int) -> Path:
    """A copy of the splits where all but `keep` shards of `split` lost their last 1 KB."""
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    for tar in sorted((data / split).glob("shard-*.tar"))[keep:]:
        tar.write_bytes(tar.read_bytes()[:-1024])
    return data


def test_a_fully_damaged_validation_split_is_refused_under_skip(
    shards: Path, tmp_path: Path
) -> None:
    data = damaged_copy(shards, tmp_path, "test", keep=0)
    with pytest.raises(PreflightError, match=r"data.validation .*expected at least one image"):
        preflight(config_for(data, "skip"), local_ray=True)


def test_an_empty_validation_split_is_refused(shards: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    manifest_path = data / "test" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for info in manifest["shards"]:
        (data / "test" / info["name"]).unlink()
    manifest_path.write_text(json.dumps({**manifest, "shards": [], "count": 0}))
    with pytest.raises(PreflightError, match=r"expected at least one image, found 0"):
        preflight(config_for(data, "fail"), local_ray=True)


def test_under_skip_one_damaged_shard_leaves_the_split_usable(shards: Path, tmp_path: Path) -> None:
    data = damaged_copy(shards, tmp_path, "train", keep=1)
    plans = preflight(config_for(data, "skip"), local_ray=True)
    assert image_count(plans["train"]) == len(list((data / "train").glob("shard-*.tar"))) * 300
    # Under fail the same split is refused before any work, as before.
    with pytest.raises(Exception, match="disagrees with the shards present"):
        preflight(config_for(data, "fail"), local_ray=True)
