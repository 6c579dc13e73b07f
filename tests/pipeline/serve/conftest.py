"""Fixtures of the serving tests: Fashion-MNIST test images scored by `flowray score`'s pipeline
(the reference every server must reproduce), and a free loopback port.

scored_images   8 held-out Fashion-MNIST test images in one shard, scored by
                pipeline.batch.scoring.job.score with the registered test model
                (models:/fmnist-test@champion): keys, pixels, PNG bytes and the Parquet rows.
free_port       a TCP port on 127.0.0.1 nobody listens on.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.pipeline.flow_fixtures import (
    MODEL_NAME,
    TrainedModel,
    prepare_fmnist,
    trained_model,  # noqa: F401  (fixture)
)

SCORED_IMAGES = 8


@dataclass(frozen=True)
class ScoredImages:
    keys: list[str]  # the shard keys `flowray score` wrote
    images: np.ndarray  # uint8 [N, 1, 28, 28], in the order of keys
    pngs: list[bytes]  # each image as the shard stores it
    rows: pd.DataFrame  # the score job's Parquet rows, indexed by key
    seed: int  # the score job's dequantization seed


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def scored_images(
    ray_local: None,
    trained_model: TrainedModel,  # noqa: F811
    fashion_mnist_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> ScoredImages:
    from pipeline.batch.scoring.job import ScoreConfig, score
    from pipeline.data.images import encode_png
    from pipeline.data.reader import iter_input

    root = tmp_path_factory.mktemp("serve-scored")
    split = prepare_fmnist(fashion_mnist_dir, str(root / "data"), SCORED_IMAGES, SCORED_IMAGES)
    config = ScoreConfig(
        model=f"models:/{MODEL_NAME}@champion",
        input=split,
        output=str(root / "scores"),
        tracking_uri=trained_model.tracking_uri,
        batch_size=SCORED_IMAGES,
        actors=1,
    )
    result = score(config)
    rows = pd.read_parquet(result.output).set_index("key")
    read = list(iter_input(split, shape=(1, 28, 28)))
    keys = [str(row["key"]) for row in read]
    images = np.stack([row["image"] for row in read])
    assert sorted(keys) == sorted(rows.index), "the score job and the reader disagree on keys"
    return ScoredImages(keys, images, [encode_png(i) for i in images], rows, config.seed)
