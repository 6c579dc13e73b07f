"""Resume safety on the driver, before Ray or MLflow start: a rerun whose model or data config
differs from its latest checkpoint's is refused naming the keys, budget keys may change, and
the epoch reached comes back from the checkpoint (on disk through the real save/load)."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flowmodel import FlowConfig, build_flow
from pipeline.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from pipeline.train.config import TrainConfig
from pipeline.train.driver import READ_PLANS_PER_EPOCH, _resume_epoch, absolute_paths
from pipeline.train.resume import ResumeConfigError, config_differences, latest_saved_run


def test_only_keys_that_cannot_change_are_named() -> None:
    saved = TrainConfig().to_dict()
    current = TrainConfig.from_dict(
        {
            "model": {"hidden_channels": 32},
            "data": {"train": "elsewhere/train"},
            "optim": {"lr": 3e-4},
            "max_steps": 9000,
            "max_minutes": 5,
            "storage": {"region": "eu-west-1"},
            "mlflow": {"experiment": "other"},
            "verbose": True,
            "fail_at_step": 3,
        }
    ).to_dict()
    assert config_differences(saved, current) == [
        "data.train",
        "model.hidden_channels",
        "optim.lr",
    ]
    assert config_differences(saved, saved) == []


def write_checkpoint(run: Path, name: str, config: TrainConfig, step: int, epoch: int) -> None:
    torch.manual_seed(0)
    flow = build_flow(FlowConfig(image_shape=(1, 8, 8), levels=2, steps_per_level=1))
    state = TrainState(step, 0, 0, {}, torch.get_rng_state(), {"train": [], "validation": []}, 0)
    save_checkpoint(run / name, flow, flow, replace(state, epoch=epoch), config.to_dict())


def test_a_changed_model_is_refused_and_a_changed_budget_resumes_at_the_saved_epoch(
    tmp_path: Path,
) -> None:
    config = absolute_paths(
        TrainConfig.from_dict(
            {"run": {"name": "tiny", "storage_path": str(tmp_path / "runs")}, "max_steps": 30}
        )
    )
    run = tmp_path / "runs" / "tiny"
    assert _resume_epoch(config) == 0  # a new run
    write_checkpoint(run, "checkpoint_2026-11-29_10-00-00.000001", config, step=10, epoch=1)
    write_checkpoint(run, "checkpoint_2026-11-29_10-05-00.000001", config, step=20, epoch=2)

    saved = latest_saved_run(str(run))
    assert saved is not None and (saved.step, saved.epoch) == (20, 2)
    assert _resume_epoch(replace(config, max_steps=90, eval_every=7)) == 2

    changed = replace(config, model=replace(config.model, hidden_channels=8))
    with pytest.raises(ResumeConfigError, match=r"step 20 .*model.hidden_channels: 64 -> 8"):
        _resume_epoch(changed)


def test_a_checkpoint_from_before_the_epoch_was_saved_resumes_at_epoch_zero(
    tmp_path: Path,
) -> None:
    config = TrainConfig()
    write_checkpoint(tmp_path, "checkpoint_1", config, step=5, epoch=3)
    state_path = tmp_path / "checkpoint_1" / "state.pt"
    raw = torch.load(state_path, weights_only=True)
    del raw["epoch"]
    torch.save(raw, state_path)
    _, _, state = load_checkpoint(tmp_path / "checkpoint_1")
    assert state.epoch == 0 and not math.isnan(state.step)
    shutil.rmtree(tmp_path / "checkpoint_1")


@pytest.fixture(scope="module")
def small_split(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_dir: Path) -> str:
    from pipeline.data.shards import prepare
    from pipeline.data.sources import open_source

    out = tmp_path_factory.mktemp("shards")
    prepare(open_source(f"idx:{fashion_mnist_dir}"), str(out), shard_samples=50, limit=300)
    return f"{out}/train"


def epoch_orders(split: str, seed: int, epochs: int) -> list[list[str]]:
    """Keys in the order one training worker's shard yields them, epoch after epoch (the
    driver's read_split, split by streaming_split as Ray Train does)."""
    from pipeline.data.reader import read_split

    dataset = read_split(split, shuffle=True, seed=seed).select_columns(["key"])
    (shard,) = dataset.streaming_split(1)
    return [
        [k for b in shard.iter_batches(batch_size=None) for k in b["key"]] for _ in range(epochs)
    ]


def test_the_shard_order_after_a_resume_at_epoch_e_is_epoch_e_of_the_uninterrupted_run(
    ray_local: None, small_split: str
) -> None:
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    preserve, options.preserve_order = options.preserve_order, True  # blocks in plan order
    try:
        uninterrupted = epoch_orders(small_split, seed=7, epochs=3)
        # The seed the driver gives the split when it resumes at epoch 1.
        resumed = epoch_orders(small_split, seed=7 + READ_PLANS_PER_EPOCH * 1, epochs=2)
    finally:
        options.preserve_order = preserve
    assert uninterrupted[1] != uninterrupted[0]
    assert resumed == uninterrupted[1:]
