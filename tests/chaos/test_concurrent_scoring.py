"""Two real `flowray score` processes started together on one output prefix.

Same settings: both may score every shard, but each shard's file is created once (the first
writer's stays), so the prefix ends with exactly one row per key. Other settings (another seed):
the settings file is created once, so one job records its settings and the other is refused before
any work, with both named; the files hold the winner's scores only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.batch.scoring.output import SETTINGS_FILE
from tests.chaos.jobs import start_job
from tests.chaos.test_score_chaos import read_scores
from tests.pipeline.flow_fixtures import (
    TrainedModel,
    prepare_fmnist,
    trained_model,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.usefixtures("ray_local")

IMAGES, PER_SHARD = 600, 100


def score_args(trained: TrainedModel, split: str, output: str, seed: int) -> list[str]:
    # Two actors of half a CPU each fit beside a read task on the session's 2 CPUs.
    return [
        "--model", str(trained.directory), "--input", split, "--output", output,
        "--tracking-uri", trained.tracking_uri, "--actors", "1", "--batch-size", "100",
        "--seed", str(seed), "--set", "cpus_per_actor=0.5", "--set", "log_to_mlflow=false",
    ]  # fmt: skip


def run_together(argvs: list[list[str]], tmp_path: Path) -> list[tuple[int, str]]:
    jobs = [start_job("score", argv, tmp_path / f"job{i}.log") for i, argv in enumerate(argvs)]
    return [(job.finish(), job.tail(20_000)) for job in jobs]


def test_two_jobs_with_the_same_settings_leave_one_row_per_key(
    trained_model: TrainedModel,  # noqa: F811
    fashion_mnist_dir: Path,
    s3,
    tmp_path: Path,
) -> None:
    images = IMAGES // 2  # S3 is the slower store: half the images keep this test under a minute
    split = prepare_fmnist(fashion_mnist_dir, f"{s3.url}/data", images, PER_SHARD, s3.storage)
    args = score_args(trained_model, split, f"{s3.url}/scores", seed=0)
    args += ["--endpoint-url", s3.endpoint_url]
    results = run_together([args, args], tmp_path)
    assert [code for code, _ in results] == [0, 0], results
    client = s3.client()
    listing = client.list_objects_v2(Bucket=s3.bucket, Prefix="scores/")["Contents"]
    names = sorted(
        item["Key"].rsplit("/", 1)[-1] for item in listing if "_summary" not in item["Key"]
    )
    assert names == [SETTINGS_FILE] + [f"shard-{i:06d}.parquet" for i in range(3)]
    prefix = listing[0]["Key"].rsplit("/", 1)[0]
    frame = read_scores(f"{s3.url}/{prefix}", s3.storage)
    assert len(frame) == images == frame["key"].nunique()
    both_planned_all = sum("scoring 3 of 3 shards" in log for _, log in results)
    print(f"two jobs, same settings: {both_planned_all} of 2 planned all 3 shards; 300 rows, once")


def test_two_jobs_with_other_seeds_one_is_refused_and_the_files_are_the_winners(
    trained_model: TrainedModel,  # noqa: F811
    fashion_mnist_dir: Path,
    tmp_path: Path,
) -> None:
    split = prepare_fmnist(fashion_mnist_dir, str(tmp_path / "data"), IMAGES, PER_SHARD)
    out = tmp_path / "scores"
    results = run_together(
        [score_args(trained_model, split, str(out), seed) for seed in (0, 1)], tmp_path
    )
    codes = [code for code, _ in results]
    assert sorted(codes) == [0, 2], results
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    refusal = results[loser][1]
    assert f"other settings (seed: {winner}; this run: {loser})" in refusal
    prefix = next(out.glob("model=local/version=*"))
    assert json.loads((prefix / SETTINGS_FILE).read_text())["seed"] == winner
    frame = read_scores(str(prefix), None)
    assert len(frame) == IMAGES == frame["key"].nunique()
    # Every row is the winner's: scoring again with the winner's seed elsewhere gives the same.
    from pipeline.batch.scoring.job import ScoreConfig, score

    again = score(
        ScoreConfig(
            model=str(trained_model.directory),
            input=split,
            output=str(tmp_path / "check"),
            tracking_uri=trained_model.tracking_uri,
            seed=winner,
            actors=1,
            log_to_mlflow=False,
        )
    )
    pd.testing.assert_frame_equal(frame, read_scores(again.output, None), check_exact=True)
