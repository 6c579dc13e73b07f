"""A resume inside an epoch continues the data order: the real worker loop (Ray Train's
per-worker API faked, fake_ray_train.py, one worker, batches in a fixed order) resumed from a
checkpoint taken mid-epoch trains on exactly the batches the uninterrupted run trained on after
that step, and one taken at the end of an epoch goes on with the next epoch. The order across
epochs through Ray Data is checked in test_resume.py; real kills in tests/chaos."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.train.checkpoint import load_checkpoint
from pipeline.train.data_order import EpochBoard, epoch_board
from pipeline.train.worker import train_loop_per_worker
from tests.pipeline.train.fake_ray_train import FakeRayTrain
from tests.pipeline.train.tiny_run import make_split, split_images, tiny_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_split(tmp_path_factory.mktemp("order-data"))  # 96 images: 12 batches of 8


def batches(run: Path) -> list[tuple[int, int, int, str]]:
    """(step, epoch, batch of epoch, digest) per recorded step, in the order recorded."""
    rows = [line.split() for line in (run / "batches-rank0.log").read_text().splitlines()]
    return [(int(s), int(e), int(b), d) for s, e, b, d, _pid in rows]


def run(split: str, runs: Path, name: str, resume_from: Path | None, monkeypatch) -> Path:
    config = tiny_config(
        split,
        max_steps=16,
        checkpoint_every=4,
        eval_every=16,
        run={"name": name, "storage_path": str(runs)},
        data={"train": split, "validation": split, "validation_limit": 16, "shuffle_buffer": 0},
    )
    saved_to = runs / name / "reports"
    saved_to.mkdir(parents=True)
    fake = FakeRayTrain(CPU, split_images(split), saved_to, resume_from)
    with monkeypatch.context() as patch:
        fake.install(patch)
        train_loop_per_worker({"train": config.to_dict(), "hooks": {"record_batches": True}})
    return runs / name


def test_a_resume_inside_an_epoch_trains_on_the_batches_the_uninterrupted_run_did(
    split: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = batches(run(split, tmp_path, "whole", None, monkeypatch))
    assert [b[0] for b in whole] == list(range(1, 17))
    # 12 batches per epoch: steps 13.. are epoch 1 from its first batch.
    assert [(b[1], b[2]) for b in whole][11:13] == [(0, 11), (1, 0)]
    reports = tmp_path / "whole" / "reports"
    _, _, mid = load_checkpoint(reports / "step-8")
    assert (mid.epoch, mid.epoch_step) == (0, 8)
    for step in (8, 12):  # mid-epoch; the last batch of epoch 0
        resumed = batches(
            run(split, tmp_path, f"from-{step}", reports / f"step-{step}", monkeypatch)
        )
        assert resumed == whole[step:], f"resumed from step {step}"
    # Rank 0 announced each epoch it started (the datasource draws the order from it).
    assert (
        epoch_board(tiny_config(split, run={"name": "whole", "storage_path": str(tmp_path)}))() == 1
    )


def test_the_board_answers_its_default_until_an_epoch_is_announced(tmp_path: Path) -> None:
    board = EpochBoard(str(tmp_path / "run"), default=3)
    assert board() == 3
    board.announce(4)
    assert board() == 4 and (tmp_path / "run" / "data_epoch").read_text() == "4\n"
    import pickle

    assert pickle.loads(pickle.dumps(board))() == 4  # as Ray ships it to the read's planner
