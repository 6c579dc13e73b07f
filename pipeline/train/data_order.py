"""The training data's order as a function of (seed, epoch), and where a resume picks it up.

Ray Data plans the training split's read again at every pass of Ray Train's streaming split,
and how often it plans per pass is Ray's business (twice per epoch in Ray 2.x). So the shard
order is not drawn from a count of plans: before each epoch, rank 0 writes the epoch it is about
to start to `<run>/data_epoch` (`EpochBoard.announce`), and the datasource, when Ray plans the
read, draws its order with `seed + EpochBoard()` (`pipeline.data.ray_source.tasks_datasource`).
Ray's streaming split starts an epoch only when every worker has asked for it, so the announcement
is written before the plan it is for. A plan made before any announcement (the driver's) gets
`default`, the epoch the run starts or resumes at.

Inside an epoch the rows come in the datasource's order (the training dataset preserves the order
of its blocks, and the local shuffle buffer is seeded with seed + epoch), so a worker that
resumes at batch b of epoch e skips the first b batches of that epoch's stream
(`LoopState.epoch_step`) and trains on exactly the batches the uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.storage import StorageConfig, join_url, read_bytes, write_bytes_atomic

if TYPE_CHECKING:
    from pipeline.train.config import TrainConfig
    from pipeline.train.loop_state import LoopState

__all__ = ["EPOCH_FILE", "EpochBoard", "epoch_board", "record_batch"]

EPOCH_FILE = "data_epoch"


@dataclass(frozen=True)
class EpochBoard:
    """The epoch the workers are about to start, in a file of the run's folder. Picklable: Ray
    ships it to the process that plans the read (Ray Data's split coordinator)."""

    run_url: str  # <run.storage_path>/<run.name>
    default: int = 0  # before the first announcement: the epoch the run (re)starts at
    storage: StorageConfig | None = None

    @property
    def url(self) -> str:
        return join_url(self.run_url, EPOCH_FILE)

    def announce(self, epoch: int) -> None:
        """Rank 0, before it asks for the epoch's first batch."""
        write_bytes_atomic(self.url, f"{epoch}\n".encode(), self.storage)

    def __call__(self) -> int:
        """The epoch last announced, else `default`."""
        try:
            return int(read_bytes(self.url, self.storage).decode().strip())
        except (FileNotFoundError, ValueError):
            return self.default


def epoch_board(config: TrainConfig, default: int = 0) -> EpochBoard:
    """The board of the run `config` names (`default`: the epoch it starts or resumes at)."""
    return EpochBoard(join_url(config.run.storage_path, config.run.name), default, config.storage)


def record_batch(config: TrainConfig, rank: int, state: LoopState, images: Any) -> None:
    """Test-only (`record_batches`): the step about to run, its epoch, its place in the epoch, a
    digest of its images and this process's pid (a test kills it), appended to
    <run>/batches-rank<rank>.log on local run storage."""
    import hashlib
    import os

    folder = os.path.join(config.run.storage_path, config.run.name)
    os.makedirs(folder, exist_ok=True)
    digest = hashlib.sha256(images.cpu().numpy().tobytes()).hexdigest()[:16]
    line = f"{state.step + 1} {state.epoch} {state.epoch_step} {digest} {os.getpid()}\n"
    with open(os.path.join(folder, f"batches-rank{rank}.log"), "a") as log:
        log.write(line)
