"""Resume safety on the driver, before Ray or MLflow start: a rerun whose model or data config
differs from its latest checkpoint's is refused naming the keys, budget keys may change, and
the epoch reached comes back from the checkpoint (on disk through the real save/load)."""

from __future__ import annotations

import hashlib
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmodel import FlowConfig, build_flow
from pipeline.train.checkpoint import (
    COMPLETE_FILE,
    ResumeConfigError,
    TrainState,
    config_differences,
    latest_saved_run,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.train.config import TrainConfig
from pipeline.train.data_order import EpochBoard
from pipeline.train.driver import _resume_epoch, absolute_paths


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
    (tmp_path / "checkpoint_1" / COMPLETE_FILE).unlink()  # it predates the file list too
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


def epoch_orders(
    split: str, board: EpochBoard, epochs: list[int], plans: int = 1
) -> list[list[str]]:
    """Keys in the order one training worker's shard yields them, for each epoch in `epochs`
    (announced on `board` first, as rank 0 does), through the driver's own dataset
    (`_training_dataset`: read_input with the board, blocks in order), split by streaming_split
    as Ray Train does. `plans`: passes over each epoch (each one a fresh plan of the read)."""
    from pipeline.data.inputs import resolve_input
    from pipeline.train.driver import _training_dataset

    config = TrainConfig.from_dict(
        {
            "model": {"image_shape": [1, 28, 28]},
            "data": {"on_error": "fail"},
            "run": {
                "name": Path(board.run_url).name,
                "storage_path": str(Path(board.run_url).parent),
            },
            "seed": 7,
        }
    )
    plan = resolve_input(split)
    (shard,) = _training_dataset(config, plan, None, board.default).streaming_split(1)
    orders = []
    for epoch in epochs:
        board.announce(epoch)
        for _ in range(plans):
            batches = shard.iter_batches(batch_size=None)
            orders.append([_key(image) for batch in batches for image in batch["image"]])
    return orders


def _key(image: np.ndarray) -> str:
    """An image's identity (the training stream carries images only)."""
    return hashlib.sha1(image.tobytes()).hexdigest()[:12]


def test_the_order_after_a_resume_at_epoch_e_is_epoch_e_of_the_uninterrupted_run(
    ray_local: None, small_split: str, tmp_path: Path
) -> None:
    """The order is a function of (seed, epoch): the same whatever Ray's count of read plans
    (an epoch read twice gives the same order twice) and after a resume at epoch 1 (a new
    dataset whose first plan asks the board)."""
    uninterrupted = epoch_orders(small_split, EpochBoard(str(tmp_path / "a")), [0, 1, 2])
    resumed = epoch_orders(small_split, EpochBoard(str(tmp_path / "b"), default=1), [1, 2])
    twice = epoch_orders(small_split, EpochBoard(str(tmp_path / "c")), [1], plans=2)
    assert len(uninterrupted[0]) == 300 and sorted(uninterrupted[0]) == sorted(uninterrupted[1])
    assert uninterrupted[0] != uninterrupted[1] != uninterrupted[2]
    assert resumed == uninterrupted[1:]
    assert twice == [uninterrupted[1], uninterrupted[1]]


def _cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage",
    ["state.pt cut short", "ema weights missing", "killed before the file list"],
)
def test_resume_skips_a_half_written_checkpoint_for_the_previous_complete_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    """A kill while Ray copies the newest checkpoint leaves its folder with files missing or
    short: the driver resumes from the one before (the one Ray Train restores), saying why."""
    config = TrainConfig()
    write_checkpoint(tmp_path, "checkpoint_2026-11-29_10-00-00.000001", config, step=10, epoch=1)
    newest = tmp_path / "checkpoint_2026-11-29_10-05-00.000001"
    write_checkpoint(tmp_path, newest.name, config, step=20, epoch=2)
    if damage == "state.pt cut short":
        _cut_short(newest / "state.pt")
    elif damage == "ema weights missing":
        (newest / "ema" / "model.safetensors").unlink()
    else:
        (newest / COMPLETE_FILE).unlink()
        (newest / "state.pt").unlink()
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's own file

    saved = latest_saved_run(str(tmp_path))
    assert saved is not None and (saved.step, saved.epoch) == (10, 1)
    assert saved.path.endswith("checkpoint_2026-11-29_10-00-00.000001")
    warnings = [r.getMessage() for r in caplog.records if "half-written" in r.getMessage()]
    assert len(warnings) == 1 and newest.name in warnings[0], warnings


def test_a_checkpoint_saved_before_the_file_list_still_resumes(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, "checkpoint_1", TrainConfig(), step=7, epoch=1)
    (tmp_path / "checkpoint_1" / COMPLETE_FILE).unlink()
    saved = latest_saved_run(str(tmp_path))
    assert saved is not None and (saved.step, saved.epoch) == (7, 1)
    _, _, state = load_checkpoint(tmp_path / "checkpoint_1")
    assert state.step == 7
