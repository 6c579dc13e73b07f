"""The training data's order as a function of (seed, epoch), and where a resume picks it up.

Ray Data plans the training read again at every pass of the streaming split, as often per pass
as Ray chooses, so the shard order is not drawn from a count of plans: before each epoch, rank 0
writes the epoch it starts to `<run>/data_epoch` (`EpochBoard.announce`), and the datasource
draws its order with `seed + EpochBoard()` when Ray plans the read. The streaming split starts an
epoch only when every worker has asked for it, so the announcement precedes the plan it is for;
a plan before any announcement (the driver's) gets `default`, the epoch the run (re)starts at.

Inside an epoch the rows keep the datasource's order (the shuffle buffer is seeded with seed +
epoch), so a worker resuming at batch b of an epoch skips its first b batches and trains on
exactly the batches the uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.storage import StorageConfig, join_url, read_bytes, write_bytes_atomic

if TYPE_CHECKING:
    from pipeline.train.config import TrainConfig
    from pipeline.train.loop_state import LoopState

EPOCH_FILE = "data_epoch"


@dataclass(frozen=True)
class EpochBoard:
    """The epoch the workers are about to start, in a file of the run's folder. Picklable: Ray
    ships it to the process that plans the read."""

    run_url: str  # <run.storage_path>/<run.name>
    default: int = 0  # before the first announcement: the epoch the run (re)starts at
    storage: StorageConfig | None = None

    @property
    def url(self) -> str:
        return join_url(self.run_url, EPOCH_FILE)

    def announce(self, epoch: int) -> None:
        write_bytes_atomic(self.url, f"{epoch}\n".encode(), self.storage)

    def __call__(self) -> int:
        try:
            return int(read_bytes(self.url, self.storage).decode().strip())
        except (FileNotFoundError, ValueError):
            return self.default


def epoch_board(config: TrainConfig, default: int = 0) -> EpochBoard:
    return EpochBoard(join_url(config.run.storage_path, config.run.name), default, config.storage)


def record_batch(config: TrainConfig, rank: int, state: LoopState, images: Any) -> None:
    """Test hook `record_batches` (pipeline.train.worker.TrainHooks)."""
    import hashlib
    import os

    folder = os.path.join(config.run.storage_path, config.run.name)
    os.makedirs(folder, exist_ok=True)
    digest = hashlib.sha256(images.cpu().numpy().tobytes()).hexdigest()[:16]
    line = f"{state.step + 1} {state.epoch} {state.epoch_step} {digest} {os.getpid()}\n"
    with open(os.path.join(folder, f"batches-rank{rank}.log"), "a") as log:
        log.write(line)
