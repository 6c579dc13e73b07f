"""What a rerun scores again: a split re-prepared at the same path is scored again where its
shards changed (never refused); a shard renamed in the input is scored under its new name and
its old file retired, so no key appears twice, while the file of a shard deleted from the input
stays; an unchanged input scores nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.batch.scoring.job import ScoreConfig, score
from pipeline.batch.scoring.output import PREPARED_SHARDS_KEY, SETTINGS_FILE
from pipeline.data.inputs import resolve_input
from tests.pipeline.data.foreign_shards import make_photos, write_shards
from tests.pipeline.flow_fixtures import (
    TrainedModel,
    prepare_array,
    trained_model,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.usefixtures("ray_local")


def config(trained: TrainedModel, input: str, output: Path) -> ScoreConfig:
    return ScoreConfig(
        model=str(trained.directory),
        input=input,
        output=str(output),
        tracking_uri=trained.tracking_uri,
        batch_size=16,
        actors=1,
        least_likely=4,
        log_to_mlflow=False,
    )


def files(prefix: str | Path) -> dict[str, int]:
    """{Parquet file name: mtime ns} under a local output prefix."""
    return {p.name: p.stat().st_mtime_ns for p in Path(prefix).glob("*.parquet")}


def test_a_split_re_prepared_at_the_same_path_is_scored_again_where_it_changed(
    trained_model: TrainedModel,  # noqa: F811
    tmp_path: Path,
) -> None:
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    split = prepare_array(images, tmp_path / "data", per_shard=2)  # 3 shards of 2
    cfg = config(trained_model, split, tmp_path / "out")
    first = score(cfg)
    assert sorted(files(first.output)) == [f"shard-00000{i}.parquet" for i in range(3)]
    recorded = json.loads((Path(first.output) / SETTINGS_FILE).read_text())
    manifest = resolve_input(split).manifest
    assert recorded[PREPARED_SHARDS_KEY] == {i.name: i.sha256 for i in manifest.shards}
    before = files(first.output)
    scores = pd.read_parquet(first.output).set_index("key")["bits_per_dim"]

    # Prepared again at the same path, the images of shard-000001 inverted.
    shutil.rmtree(tmp_path / "data" / "shards")
    changed = images.copy()
    changed[2:4] = 255 - changed[2:4]
    assert prepare_array(changed, tmp_path / "data", per_shard=2) == split
    sha = resolve_input(split).shards[1].expect.sha256
    second = score(cfg)
    assert second.status == "complete" and second.shards_written == ("shard-000001.tar",)
    assert second.shards_changed == 1 and second.shards_already_done == 2
    after = files(first.output)
    assert sorted(after) == ["shard-000000.parquet", f"shard-000001@{sha[:12]}.parquet"] + [
        "shard-000002.parquet"
    ]
    assert all(after[n] == before[n] for n in ("shard-000000.parquet", "shard-000002.parquet"))
    frame = pd.read_parquet(first.output).set_index("key")["bits_per_dim"]
    assert len(frame) == 6 == frame.index.nunique()
    renewed = [k for k in frame.index if frame[k] != scores[k]]
    assert sorted(renewed) == sorted(scores.index[2:4])  # the inverted images' scores only

    again = score(cfg)
    assert again.shards_written == () and again.shards_already_done == 3
    assert files(first.output) == after


def test_a_renamed_shard_keeps_its_keys_once_and_a_deleted_shard_keeps_its_file(
    trained_model: TrainedModel,  # noqa: F811
    tmp_path: Path,
) -> None:
    folder = tmp_path / "incoming"
    photos = make_photos(9)
    write_shards(folder, photos, per_shard=3)  # 000000..000002
    cfg = config(trained_model, str(folder), tmp_path / "out")
    first = score(cfg)
    before = files(first.output)
    scores = pd.read_parquet(first.output).set_index("key")["bits_per_dim"]

    (folder / "000001.tar").rename(folder / "000007.tar")  # renamed
    (folder / "000002.tar").unlink()  # deleted by a retention policy
    second = score(cfg)
    assert second.shards_written == (str(folder / "000007.tar"),)
    after = files(first.output)
    assert sorted(name.split("@")[0] for name in after) == ["000000", "000002", "000007"]
    kept = [name for name in before if not name.startswith("000001@")]
    assert all(after[name] == before[name] for name in kept)
    frame = pd.read_parquet(first.output)
    assert len(frame) == 9 == frame["key"].nunique()  # every key once
    by_key = frame.set_index("key")
    assert set(by_key.loc[[p.key for p in photos[3:6]], "shard"]) == {str(folder / "000007.tar")}
    assert by_key["bits_per_dim"].to_dict() == scores.to_dict()

    again = score(cfg)
    assert again.shards_written == () and files(first.output) == after


def test_a_root_recorded_in_the_settings_names_the_shards_while_it_holds_them(
    tmp_path: Path,
) -> None:
    from pipeline.batch.scoring.job import _recorded_root

    write_shards(tmp_path / "drops" / "a", make_photos(4), per_shard=2)
    listing = tmp_path / "lists" / "nightly.txt"
    listing.parent.mkdir()
    listing.write_text(f"{tmp_path}/drops/a/{{000000..000001}}.tar\n")
    plan = resolve_input(str(listing))
    # A prefix first scored when a list's root was its shards' common folder keeps that root.
    old_root = str(tmp_path / "drops" / "a")
    kept = _recorded_root(plan, {"input": old_root})
    assert kept.root == old_root and [r.name for r in kept.shards] == ["000000.tar", "000001.tar"]
    assert _recorded_root(plan, None) is plan
    assert _recorded_root(plan, {"input": str(tmp_path / "drops" / "b")}) is plan  # not under it
