"""Chaos scoring: a real `flowray score` reads its shards through the fault-injecting S3 proxy
(5% of object GETs answered with a 500, a 503 SlowDown, a reset, a stall or a cut body), its driver
is SIGKILLed at a random moment, and a rerun (through the same faults) finishes the job: exactly N
rows, no duplicate, every row equal to an uninterrupted run's.

Default tier: 2,000 images, one seed. Slow tier (`-m slow`): 20,000 images, three seeds. The seed
decides which GETs fail and when the driver is killed (after a random number of shard files).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from pipeline.batch.scoring.output import OUTPUT_COLUMNS, SETTINGS_FILE
from tests.chaos.jobs import run_job, start_job
from tests.faults.s3_proxy import FaultPlan
from tests.pipeline.flow_fixtures import (
    TrainedModel,
    trained_model,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.usefixtures("ray_local")

FAULT_RATE = 0.05


@dataclass(frozen=True)
class Case:
    images: int
    per_shard: int
    seed: int

    @property
    def shards(self) -> int:
        return -(-self.images // self.per_shard)


def prepare_train_images(fashion_mnist_dir: Path, out: str, case: Case, storage) -> str:
    """The first `case.images` Fashion-MNIST training images as shards at `out`; the split URL."""
    from pipeline.data.shards import prepare
    from pipeline.data.sources import IdxSource

    source = IdxSource(str(fashion_mnist_dir), storage)
    prepare(source, out, storage, splits=["train"], shard_samples=case.per_shard, limit=case.images)
    return f"{out}/train"


def read_scores(prefix: str, storage) -> pd.DataFrame:
    """Every row of the Parquet files under an s3:// or local prefix, sorted by key."""
    import pyarrow.dataset as pads

    from pipeline.storage import arrow_filesystem

    filesystem, path = arrow_filesystem(prefix, storage)
    table = pads.dataset(
        path, filesystem=filesystem, format="parquet", exclude_invalid_files=False
    ).to_table()
    frame = table.to_pandas()[list(OUTPUT_COLUMNS)]
    return frame.sort_values("key", kind="stable").reset_index(drop=True)


def s3_names(bucket, prefix: str) -> list[str]:
    """Names of the objects directly under `prefix` in the test bucket (around the proxy)."""
    client = bucket.client(direct=True)
    listing = client.list_objects_v2(Bucket=bucket.bucket, Prefix=prefix.rstrip("/") + "/")
    return sorted(item["Key"].rsplit("/", 1)[-1] for item in listing.get("Contents", []))


def chaos_score(case: Case, faulty_s3, trained: TrainedModel, fmnist: Path, tmp_path: Path):
    from pipeline.batch.scoring.job import ScoreConfig, score

    direct, through = faulty_s3.direct, faulty_s3.bucket
    split = prepare_train_images(fmnist, f"{direct.url}/data", case, direct.storage)
    common = {"batch_size": 100, "actors": 1, "on_error": "skip", "log_to_mlflow": False}
    reference = score(
        ScoreConfig(
            model=str(trained.directory),
            input=split,
            output=str(tmp_path / "uninterrupted"),
            storage=direct.storage,
            tracking_uri=trained.tracking_uri,
            **common,
        )
    )
    expected = read_scores(reference.output, None)
    assert len(expected) == case.images

    faulty_s3.proxy.set_plan(FaultPlan(seed=case.seed, rate=FAULT_RATE))
    args = [
        "--model", str(trained.directory), "--input", split, "--output", f"{through.url}/scores",
        "--endpoint-url", through.endpoint_url, "--tracking-uri", trained.tracking_uri,
        "--batch-size", "100", "--actors", "1", "--on-error", "skip",
        "--set", "log_to_mlflow=false",
    ]  # fmt: skip
    prefix = f"scores/model=local/version={reference.model_version}"
    kill_after = random.Random(case.seed).randrange(0, case.shards - 2)  # 2+ shards to go
    job = start_job("score", args, tmp_path / "killed.log")

    def written() -> list[str]:
        return [n for n in s3_names(direct, prefix) if n.endswith(".parquet")]

    job.wait_for(
        lambda: SETTINGS_FILE in s3_names(direct, prefix) and len(written()) >= kill_after,
        f"{kill_after} shard files",
    )
    job.kill_driver()
    survived = written()
    # A file present is whole: every one holds all the rows of its shard.
    partial = read_scores(f"{direct.url}/{prefix}", direct.storage)
    assert len(partial) == case.per_shard * len(survived) == partial["key"].nunique()

    code, log = run_job("score", args, tmp_path / "rerun.log")
    assert code == 0, log
    assert f"{len(survived)} already done" in log
    got = read_scores(f"{direct.url}/{prefix}", direct.storage)
    assert len(got) == case.images and got["key"].nunique() == case.images
    pd.testing.assert_frame_equal(got, expected, check_exact=True)
    faults = {
        k: faulty_s3.proxy.counts[k] for k in ("gets", "500", "503", "reset", "stall", "truncate")
    }
    assert sum(faults.values()) - faults["gets"] > 0  # faults were met
    print(
        f"chaos score {case}: killed after {len(survived)}/{case.shards} shard files, the rerun "
        f"wrote the rest; object GETs and faults of both runs {faults}; {len(got)} rows, "
        "0 duplicates, equal to the uninterrupted run's"
    )


def test_scoring_under_faults_killed_and_rerun_gives_every_row_once_as_uninterrupted(
    faulty_s3,
    trained_model: TrainedModel,  # noqa: F811
    fashion_mnist_dir: Path,
    tmp_path: Path,
) -> None:
    chaos_score(Case(2_000, 200, seed=1), faulty_s3, trained_model, fashion_mnist_dir, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3, 4])
def test_scoring_20000_images_under_faults_killed_and_rerun(
    seed: int,
    faulty_s3,
    trained_model: TrainedModel,  # noqa: F811
    fashion_mnist_dir: Path,
    tmp_path: Path,
) -> None:
    chaos_score(Case(20_000, 1_000, seed), faulty_s3, trained_model, fashion_mnist_dir, tmp_path)
