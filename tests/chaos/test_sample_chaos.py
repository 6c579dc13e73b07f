"""Chaos sampling: a real `flowray sample` has its driver SIGKILLed at a random moment while it
writes shards, then a rerun finishes: the same shards, byte for byte, as an uninterrupted run, the
same manifest entries, and no temp file left (the rerun sweeps the dead writer's temps and keeps a
live writer's).

Sampling reads nothing from object storage but its model, so the fault proxy has nothing to act
on here; the kill is the fault. Default tier: 2,000 images, one seed; slow tier: 20,000, three.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from pipeline.batch.sampling import SampleConfig, generate
from pipeline.storage import make_temp_file
from tests.chaos.jobs import run_job, start_job
from tests.pipeline.flow_fixtures import (
    TrainedModel,
    trained_model,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.usefixtures("ray_local")

SETTINGS = {"chunk_size": 50, "shard_samples": 200, "grid_images": 4, "log_to_mlflow": False}


def shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tar"))}


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def manifest_shards(folder: Path) -> list[dict]:
    return json.loads((folder / "manifest.json").read_text())["shards"]


def chaos_sample(images: int, seed: int, trained: TrainedModel, tmp_path: Path) -> None:
    reference = tmp_path / "uninterrupted"
    generate(
        SampleConfig(
            model=str(trained.directory),
            output=str(reference),
            n=images,
            seed=seed,
            tracking_uri=trained.tracking_uri,
            **SETTINGS,
        )
    )
    expected = shards(reference)
    out = tmp_path / "out"
    args = [
        "--model", str(trained.directory), "--output", str(out), "-n", str(images),
        "--seed", str(seed), "--tracking-uri", trained.tracking_uri,
        *[item for k, v in SETTINGS.items() for item in ("--set", f"{k}={v}".lower())],
    ]  # fmt: skip
    kill_after = random.Random(seed).randrange(0, len(expected) - 3)  # 3+ shards to go
    job = start_job("sample", args, tmp_path / "killed.log")
    job.wait_for(
        lambda: out.is_dir() and len(shards(out)) >= kill_after, f"{kill_after} shard files"
    )
    job.kill_driver()
    survived = shards(out)
    assert not (out / "manifest.json").exists()
    # A shard present is whole: the bytes of the uninterrupted run's shard.
    assert all(data == expected[name] for name, data in survived.items())
    # A temp of the dead driver (as a kill between write and rename leaves it), and one of a
    # live writer, which the rerun must leave alone.
    live = Path(make_temp_file(str(out / "shard-000099.tar")))
    dead = out / re.sub(r"-\d+-", f"-{job.process.pid}-", live.name, count=1)
    dead.write_bytes(b"half a shard")

    code, log = run_job("sample", args, tmp_path / "rerun.log")
    assert code == 0, log
    assert f"generated {images:,} images" in log
    assert shards(out) == expected
    assert manifest_shards(out) == manifest_shards(reference)
    assert (out / "grid.png").read_bytes() == (reference / "grid.png").read_bytes()
    assert hidden(out) == [live.name]
    live.unlink()
    print(
        f"chaos sample {images} images seed {seed}: killed with {len(survived)}/{len(expected)} "
        "shards written; the rerun's shards are byte-identical to the uninterrupted run's"
    )


def test_sampling_killed_and_rerun_writes_the_uninterrupted_runs_bytes(
    trained_model: TrainedModel,  # noqa: F811
    tmp_path: Path,
) -> None:
    chaos_sample(2_000, 1, trained_model, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3, 4])
def test_sampling_20000_images_killed_and_rerun(
    seed: int,
    trained_model: TrainedModel,  # noqa: F811
    tmp_path: Path,
) -> None:
    chaos_sample(20_000, seed, trained_model, tmp_path)
