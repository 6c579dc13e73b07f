"""Training checkpoints: a directory Ray Train persists to `storage_path` (local or s3://).

model.safetensors / flow_config.json   the flow being trained (pipeline.model.artifact layout)
ema/model.safetensors, ema/...         the Polyak average (the model evaluated and shipped)
state.pt                               `TrainState` but the weights: tensors and plain Python
                                       only, loaded with weights_only=True
train_config.json                      the resolved TrainConfig
complete.json                          written last: {"files": {relative path: size in bytes}}

Ray Train copies the folder file by file, in no set order, so a kill during the copy leaves some
files, or a short one: a folder whose files are all there at the sizes complete.json lists is
complete, and a resume skips any other (`checkpoint_problem`). A folder without the list is
judged by the files of the layout being there.

Every tensor is written from and read onto the CPU, so a checkpoint written on a GPU resumes on
a CPU-only machine and the reverse.

A rerun resumes from the latest complete checkpoint: the driver reads its config (a changed model
or data config is refused, naming the keys) and its epoch before Ray starts. A resume restores
everything of `TrainState` and skips the batches of the epoch consumed before
(pipeline.train.data_order). With one worker those are exactly the uninterrupted run's batches;
with several, Ray's streaming split chooses which rows go to which worker, so the right number
of rows is skipped but not necessarily the same rows.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch

from flowmodel import Flow
from flowmodel.errors import FlowrayError
from flowmodel.typed import flatten
from pipeline.model.artifact import load_flow, save_flow
from pipeline.storage import StorageConfig, fsspec_filesystem, redact_url
from pipeline.train.config import TrainConfig

if TYPE_CHECKING:
    import fsspec

logger = logging.getLogger(__name__)

COMPLETE_FILE = "complete.json"
# The files of the layout above: what a checkpoint without COMPLETE_FILE must hold.
LAYOUT_FILES = (
    "model.safetensors",
    "flow_config.json",
    "ema/model.safetensors",
    "ema/flow_config.json",
    "state.pt",
    "train_config.json",
)


def _on_cpu(value: Any) -> Any:
    """Every tensor of a nested state (an optimizer's state_dict) copied to the CPU: moments
    saved on a GPU would only load where that GPU exists."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(item) for item in value)
    return value


@dataclass
class TrainState:
    """What a checkpoint holds besides the two models' weights."""

    step: int
    images_seen: int
    skipped_steps: int
    optimizer: dict[str, Any]
    rng: torch.Tensor
    history: dict[str, list[list[float]]]  # "train"/"validation" -> [[step, bits/dim], ...]
    ema_updates: int  # `EMA.updates`: steps that updated the average (skipped steps do not)
    epoch: int = 0  # passes over the training split finished; the shard order is seed + epoch
    # The step loop's wall time over all resumes: a resumed run continues its time budget.
    elapsed_seconds: float = 0.0
    # Batches of the current epoch consumed (trained or skipped): a resume skips as many.
    epoch_step: int = 0


def save_checkpoint(
    directory: Path, flow: Flow, ema: Flow, state: TrainState, config: dict
) -> None:
    save_flow(flow, directory)
    save_flow(ema, directory / "ema")
    raw = {**vars(state), "optimizer": _on_cpu(state.optimizer), "rng": state.rng.cpu()}
    torch.save(raw, directory / "state.pt")
    # No `user:password@` of a tracking URL in a checkpoint (it is stored next to the data).
    (directory / "train_config.json").write_text(redact_url(json.dumps(config, indent=2)))
    files = {
        path.relative_to(directory).as_posix(): path.stat().st_size
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != COMPLETE_FILE
    }
    (directory / COMPLETE_FILE).write_text(json.dumps({"files": files}, indent=1))


def checkpoint_problem(fs: fsspec.AbstractFileSystem, directory: str) -> str | None:
    """Why the checkpoint folder `directory` (a path of `fs`) is not complete, or None."""
    directory = directory.rstrip("/")
    found = {
        name[len(directory) + 1 :]: int(info.get("size") or 0)
        for name, info in fs.find(directory, detail=True).items()
    }
    if COMPLETE_FILE not in found:
        missing = [name for name in LAYOUT_FILES if name not in found]
        if missing:
            return f"no {COMPLETE_FILE} and missing {', '.join(missing)}"
        return None
    try:
        listed = json.loads(fs.cat_file(f"{directory}/{COMPLETE_FILE}"))["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"{COMPLETE_FILE} is unreadable ({type(err).__name__}: {err})"
    wrong = [
        f"{name} ({'missing' if name not in found else f'{found[name]} bytes'}, expected {size})"
        for name, size in sorted(listed.items())
        if found.get(name) != size
    ]
    return f"files missing or short: {', '.join(wrong)}" if wrong else None


def load_checkpoint(directory: Path) -> tuple[Flow, Flow, TrainState]:
    """(flow, ema, state) from a checkpoint directory, on the CPU; nothing is unpickled. The
    directory is one Ray Train registered (copied whole) or one that `checkpoint_problem` passed.
    """
    flow, ema = load_flow(directory), load_flow(directory / "ema")
    raw = _load_state(directory / "state.pt")
    # Fields a state.pt lacks take their defaults; a missing EMA count restarts at the step.
    raw.setdefault("ema_updates", raw["step"])
    return flow, ema, TrainState(**raw)


def _load_state(source: Path | BinaryIO) -> dict[str, Any]:
    return torch.load(source, weights_only=True, map_location="cpu")


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


class ResumeConfigError(FlowrayError, ValueError):
    """The rerun's config differs from its checkpoint's in keys that cannot change."""


def _may_change(key: str) -> bool:
    return any(key.startswith(m) if m.endswith(".") else key == m for m in MAY_CHANGE)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, the keys in MAY_CHANGE left out. A key on one side only
    counts at its default, so a checkpoint without a newer setting resumes under its default."""
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
                raw = _load_state(io.BytesIO(fs.cat_file(f"{directory}/state.pt")))
                config = json.loads(fs.cat_file(f"{directory}/train_config.json"))
                return SavedRun(directory, config, int(raw["step"]), int(raw.get("epoch", 0)))
            except Exception as err:  # a short or garbled file of a checkpoint with no list
                problem = f"{type(err).__name__}: {err}"
        logger.warning("skipping half-written checkpoint %s: %s", directory, problem)
    return None


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
