"""A small flow trained once per test session on real Fashion-MNIST, saved and registered, plus
helpers to make shard sets. Imported by the scoring, sampling, resolver and job tests.

Training runs once per process (cached here, not per fixture), whichever test module asks first:
a couple of thousand training images, ~100 steps of `pipeline.train.step.train_step`.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

MODEL_NAME = "fmnist-test"
VAL_BITS_PER_DIM_TAG = 4.5  # any number: the registry tag the promotion tests compare against


@dataclass(frozen=True)
class TrainedModel:
    directory: Path  # local model dir (safetensors + flow_config.json)
    tracking_uri: str  # SQLite MLflow store holding MODEL_NAME v1 aliased candidate + champion
    root: Path  # session folder for data the tests share
    name: str = MODEL_NAME


def read_idx_images(folder: Path, name: str, count: int) -> torch.Tensor:
    """The first `count` images of an IDX file: uint8 [count, 1, 28, 28]."""
    with gzip.open(folder / name, "rb") as file:
        data = np.frombuffer(file.read(), dtype=np.uint8, offset=16)
    return torch.from_numpy(data[: count * 784].reshape(count, 1, 28, 28).copy())


_TRAINED: dict[Path, TrainedModel] = {}


def _train(fashion_mnist_dir: Path, root: Path) -> TrainedModel:
    import mlflow

    from flowmodel import FlowConfig, build_flow
    from pipeline.model.artifact import save_flow
    from pipeline.tracking.connection import ensure_experiment
    from pipeline.tracking.registry import log_flow_model, register_flow
    from pipeline.train.step import train_step

    images = read_idx_images(fashion_mnist_dir, "train-images-idx3-ubyte.gz", 2048)
    torch.manual_seed(0)
    flow = build_flow(FlowConfig(levels=2, steps_per_level=2, hidden_channels=16))
    generator = torch.Generator().manual_seed(0)
    flow.initialize(images[:256], generator=generator)
    optimizer = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for _ in range(100):
        batch = images[torch.randint(0, len(images), (32,), generator=generator)]
        train_step(flow, batch, optimizer, generator=generator)
    flow.eval()
    directory = save_flow(flow, root / "model")

    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    experiment_id = ensure_experiment(tracking_uri, "tests")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        info = log_flow_model(flow)
        register_flow(info.model_uri, MODEL_NAME, VAL_BITS_PER_DIM_TAG, run.info.run_id)
    return TrainedModel(directory, tracking_uri, root)


@pytest.fixture(scope="session")
def trained_model(
    fashion_mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> TrainedModel:
    # Cached per process: each test module that imports this fixture gets its own session-scoped
    # copy of it, but the model is trained once.
    if fashion_mnist_dir not in _TRAINED:
        root = tmp_path_factory.mktemp("trained-flow")
        _TRAINED[fashion_mnist_dir] = _train(fashion_mnist_dir, root)
    return _TRAINED[fashion_mnist_dir]


def prepare_fmnist(
    fashion_mnist_dir: Path, out: str, count: int, per_shard: int, storage=None
) -> str:
    """`count` held-out (test split) Fashion-MNIST images as shards of `per_shard`; the split URL."""
    from pipeline.data.shards import prepare
    from pipeline.data.sources import IdxSource

    source = IdxSource(str(fashion_mnist_dir), storage)
    prepare(source, out, storage, splits=["test"], shard_samples=per_shard, limit=count)
    return f"{out.rstrip('/')}/test"


def prepare_array(images: np.ndarray, folder: Path, per_shard: int) -> str:
    """uint8 images [N, H, W] (or [N, C, H, W]) as shards via a .npy source; the split URL."""
    from pipeline.data.shards import prepare
    from pipeline.data.sources import NpySource

    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", images)
    out = folder / "shards"
    prepare(NpySource(str(folder / "images.npy")), str(out), shard_samples=per_shard)
    return str(out / "train")
