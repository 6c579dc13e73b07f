"""Chaos training: a real `flowray train` (one Ray Train worker, joined to the session's Ray) is
SIGKILLed at a random step, once its driver, once its worker process, and finishes by a rerun
(driver) or by Ray Train replacing the worker (worker). The step history in the final checkpoint
has every step once, and the batch each step trained on (the `record_batches` test hook: a digest
of its images) is the uninterrupted run's: the resumed epoch continues where it stopped, no
image of it is seen twice or skipped, and the next epochs' orders are the uninterrupted ones.

Slow (five short trainings, ~3 minutes on 2 loaded cores); the same order is checked fast by
tests/pipeline/train/test_data_order.py (the worker loop) and test_resume.py (Ray Data).
"""

from __future__ import annotations

import json
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.train.checkpoint import load_checkpoint
from pipeline.train.worker import HOOKS_VARIABLE
from tests.chaos.jobs import run_job, start_job
from tests.pipeline.train.tiny_run import make_split, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

STEPS = 30  # 96 images in batches of 8: 12 per epoch, so 2.5 epochs


@pytest.fixture(scope="module", autouse=True)
def record_batches() -> Iterator[None]:
    """Every job of this module records its batches: the test hook, in the jobs' environment."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(HOOKS_VARIABLE, json.dumps({"record_batches": True}))
        yield


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_split(tmp_path_factory.mktemp("chaos-train-data"))


def config_file(split: str, tmp_path: Path, name: str) -> Path:
    config = tiny_config(
        split,
        max_steps=STEPS,
        checkpoint_every=4,
        eval_every=STEPS,
        log_every=10,
        scaling={"num_workers": 1, "cpus_per_worker": 1, "max_failures": 2},
        run={"name": name, "storage_path": str(tmp_path / "runs")},
        mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "registered_model": name},
        workdir=str(tmp_path),
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def records(run: Path) -> list[list[str]]:
    """[step, epoch, batch of epoch, digest, pid] per recorded step, in the order recorded."""
    log = run / "batches-rank0.log"
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def trained_batches(run: Path) -> dict[int, tuple[str, str, str]]:
    """step -> (epoch, batch of epoch, digest) of the attempt that went on (a step replayed
    after a kill is recorded again; the later record is the one the final model saw)."""
    return {int(r[0]): (r[1], r[2], r[3]) for r in records(run)}


def history_steps(run: Path) -> list[int]:
    latest = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())[-1]
    _, _, state = load_checkpoint(latest)
    assert state.step == STEPS
    return [int(step) for step, _ in state.history["train"]]


@pytest.fixture(scope="module")
def uninterrupted(split: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    code, log = run_job("train", ["--config", str(config_file(split, tmp_path, "whole"))],
                        tmp_path / "whole.log")  # fmt: skip
    assert code == 0, log
    batches = trained_batches(tmp_path / "runs" / "whole")
    assert sorted(batches) == list(range(1, STEPS + 1))
    assert {b[0] for b in batches.values()} == {"0", "1", "2"}
    return batches


@pytest.mark.parametrize("victim", ["driver", "worker"])
def test_a_killed_training_resumes_with_every_step_once_and_the_same_batches(
    victim: str, split: str, uninterrupted: dict, tmp_path: Path
) -> None:
    name = f"killed-{victim}"
    args = ["--config", str(config_file(split, tmp_path, name))]
    run = tmp_path / "runs" / name
    kill_at = random.Random(victim).randrange(6, STEPS - 4)  # past a checkpoint, mid-epoch
    job = start_job("train", args, tmp_path / "killed.log")
    job.wait_for(lambda: len(records(run)) >= kill_at, f"step {kill_at}")
    if victim == "driver":
        job.kill_driver()
        code, log = run_job("train", args, tmp_path / "rerun.log")
        assert code == 0 and "resuming" in log, log
    else:
        os.kill(int(records(run)[-1][4]), signal.SIGKILL)
        assert job.finish() == 0, job.tail()
    seen = records(run)
    assert len({r[4] for r in seen}) == 2, "the steps after the kill ran in a new process"
    assert history_steps(run) == list(range(1, STEPS + 1))  # no gap, no repeat
    assert trained_batches(run) == uninterrupted
