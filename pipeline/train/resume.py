"""What a rerun resumes from, read on the driver before Ray starts: the latest checkpoint's
config (a changed model or data config is refused, naming the keys) and its epoch.

A resume restores everything of `TrainState` and skips the batches of the epoch consumed before
(pipeline.train.data_order). With one worker those are exactly the uninterrupted run's batches;
with several, Ray's streaming split chooses which rows go to which worker, so the right number
of rows is skipped but not necessarily the same rows.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from flowmodel.errors import FlowrayError
from flowmodel.typed import flatten
from pipeline.storage import StorageConfig, fsspec_filesystem
from pipeline.train.checkpoint import checkpoint_problem

# Keys that may change between a run and its resume: budgets, cadences, where things are logged
# or stored, and the test hooks older checkpoints' configs hold. Everything else must match.
MAY_CHANGE = (
    "max_minutes",
    "max_steps",
    "eval_every",
    "checkpoint_every",
    "log_every",
    "verbose",
    "hold_at_step",
    "record_batches",
    "fail_at_step",
    "storage.",
    "mlflow.",
    "run.address",
    "scaling.max_failures",
    "scaling.placement_strategy",
)

logger = logging.getLogger(__name__)


class ResumeConfigError(FlowrayError, ValueError):
    """The rerun's config differs from its checkpoint's in keys that cannot change."""


def _may_change(key: str) -> bool:
    return any(key.startswith(m) if m.endswith(".") else key == m for m in MAY_CHANGE)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, the keys in MAY_CHANGE left out. A key on one side only
    counts at its default, so a checkpoint without a newer setting resumes under its default."""
    from pipeline.train.config import TrainConfig

    defaults = flatten(TrainConfig().to_dict())
    old, new = flatten(saved), flatten(current)
    changed = sorted(
        k
        for k in old.keys() | new.keys()
        if old.get(k, defaults.get(k)) != new.get(k, defaults.get(k))
    )
    return [k for k in changed if not _may_change(k)]


@dataclass(frozen=True)
class SavedRun:
    path: str
    config: dict[str, Any]
    step: int
    epoch: int


def latest_saved_run(run_url: str, storage: StorageConfig | None = None) -> SavedRun | None:
    """The newest complete `checkpoint_<timestamp>` under `run_url` (Ray Train's names sort by
    time), or None. A half-written folder is skipped with a warning naming what is wrong, for the
    previous one, which is also the one Ray Train restores (it registers only whole copies).
    """
    fs, path = fsspec_filesystem(run_url, storage)
    entries = fs.glob(f"{path.rstrip('/')}/checkpoint_*", detail=True)
    # Folders only: Ray Train keeps files of its own beside them (checkpoint_manager_snapshot.json).
    folders = sorted(
        (name.rstrip("/") for name, info in entries.items() if info.get("type") == "directory"),
        reverse=True,
    )
    for directory in folders:
        problem = checkpoint_problem(fs, directory)
        if problem is None:
            try:
                return _read_saved_run(fs, directory)
            except Exception as err:  # a short or garbled file of a checkpoint with no list
                problem = f"{type(err).__name__}: {err}"
        logger.warning("skipping half-written checkpoint %s: %s", directory, problem)
    return None


def _read_saved_run(fs: Any, directory: str) -> SavedRun:
    import io

    import torch

    raw = torch.load(
        io.BytesIO(fs.cat_file(f"{directory}/state.pt")), weights_only=True, map_location="cpu"
    )
    return SavedRun(
        path=directory,
        config=json.loads(fs.cat_file(f"{directory}/train_config.json")),
        step=int(raw["step"]),
        epoch=int(raw.get("epoch", 0)),
    )


def check_resume(saved: SavedRun, current: dict[str, Any]) -> None:
    differences = config_differences(saved.config, current)
    if differences:
        old, new = flatten(saved.config), flatten(current)
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differences[:10])
        raise ResumeConfigError(
            f"the checkpoint at step {saved.step} ({saved.path}) was trained with another config: "
            f"{shown}",
            hint="rerun with the checkpoint's values for these keys, or start a new run (another "
            "run.name)",
        )
