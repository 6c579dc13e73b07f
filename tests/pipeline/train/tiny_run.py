"""A tiny training setup for the device tests: an 8x8 greyscale shard set and a config whose
worker loop runs a few steps in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.data.reader import iter_input
from pipeline.data.shards import load_manifest
from pipeline.train.config import TrainConfig
from tests.pipeline.flow_fixtures import prepare_array

MODEL = {"image_shape": [1, 8, 8], "levels": 2, "steps_per_level": 1, "hidden_channels": 8}


def smooth_images(count: int, seed: int = 0) -> np.ndarray:
    """uint8 [count, 8, 8]: 2x2 blocks of random grey plus a little noise (learnable)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (count, 2, 2)).repeat(4, axis=1).repeat(4, axis=2)
    return np.clip(blocks + rng.integers(-8, 9, blocks.shape), 0, 255).astype(np.uint8)


def make_split(folder: Path) -> str:
    """96 smooth images as shards of 48; the split URL."""
    return prepare_array(smooth_images(96), folder, per_shard=48)


def tiny_config(split: str, **overrides: object) -> TrainConfig:
    """4 steps of batch 8, a checkpoint every 2, evaluation on 24 images at the end."""
    values: dict[str, object] = {
        "model": MODEL,
        "data": {"train": split, "validation": split, "validation_limit": 24},
        "optim": {"warmup_steps": 2},
        "batch_size": 8,
        "max_steps": 4,
        "eval_every": 4,
        "checkpoint_every": 2,
        "log_every": 2,
        "eval_batch_size": 16,
        "init_images": 32,
        **overrides,
    }
    return TrainConfig.from_dict(values)


def split_images(split: str) -> torch.Tensor:
    """uint8 [N, C, H, W] of the split, in manifest order."""
    rows = iter_input(split, shape=load_manifest(split).shape)
    return torch.from_numpy(np.stack([row["image"] for row in rows]))
