"""TrainConfig: everything `flowray train` needs, typed, with the only copy of each default.

Paths default to the one work folder of every command (`default_workdir()`: $FLOWRAY_WORKDIR, else
flowray-work), where `flowray prepare --output flowray-work/data` and `make demo` put the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from flowmodel import FlowConfig, Precision
from flowmodel.typed import check_at_least, from_dict, to_dict
from pipeline.storage import StorageConfig
from pipeline.tracking.connection import default_workdir


def _in_workdir(*parts: str) -> str:
    return "/".join((default_workdir(), *parts))


@dataclass(frozen=True)
class DataSettings:
    """The training and validation images.

    Attributes:
        train: a split written by `flowray prepare`, or WebDataset shards read in place (a brace
            pattern, a prefix of .tar files or a list file); local or s3://.
        validation: the same, for the validation bits/dim.
        on_error: an unreadable image is logged, counted and left out ("skip") or stops the run.
        shuffle_buffer: rows in Ray Data's local shuffle buffer per worker.
        validation_limit: evaluate on the first N images only (None: the whole split).
    """

    train: str = field(default_factory=lambda: _in_workdir("data", "train"))
    validation: str = field(default_factory=lambda: _in_workdir("data", "test"))
    on_error: Literal["skip", "fail"] = "skip"
    shuffle_buffer: int = 2048
    validation_limit: int | None = None


@dataclass(frozen=True)
class OptimSettings:
    optimizer: Literal["adam", "adamax"] = "adam"
    lr: float = 1e-3
    warmup_steps: int = 200  # linear warmup from 0 to lr
    # "constant" keeps lr; "cosine" and "linear" decay it to min_lr_ratio * lr at the end of the
    # budget (max_steps or max_minutes, whichever binds first): step.learning_rate.
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 50.0
    weight_decay: float = 0.0
    ema_decay: float = 0.999  # Polyak average used for evaluation and the final model; 0 = off

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr: expected > 0, found {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: expected in [0, 1], found {self.min_lr_ratio}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay: expected in [0, 1), found {self.ema_decay}")


@dataclass(frozen=True)
class ScalingSettings:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # dead workers replaced, resuming from the latest checkpoint
    # PACK fills a node before the next; SPREAD puts workers on different nodes when it can.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    def __post_init__(self) -> None:
        check_at_least(self, 1, "num_workers")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker: expected > 0, found {self.cpus_per_worker}")


@dataclass(frozen=True)
class RunSettings:
    """Where checkpoints go. Rerunning with the same name and storage_path resumes the run.

    Attributes:
        name: the run's name: its checkpoint folder and its MLflow run.
        storage_path: checkpoints go to <storage_path>/<name>/ (local or s3://; a cluster needs
            storage every node reaches).
        address: Ray cluster address, e.g. ray://head:10001 or auto (None: $RAY_ADDRESS, else a
            local Ray started in this process).
    """

    name: str = "fashion-flow"
    storage_path: str = field(default_factory=lambda: _in_workdir("runs"))
    address: str | None = None


@dataclass(frozen=True)
class MlflowSettings:
    """Where the run, its metrics and the model are logged and registered.

    Attributes:
        tracking_uri: MLflow tracking URI (None: $MLFLOW_TRACKING_URI, else
            sqlite:///<workdir>/mlflow.db).
        experiment: MLflow experiment of the run.
        registered_model: the registry name the model is registered under.
    """

    tracking_uri: str | None = None
    experiment: str = "flowray"
    registered_model: str = "fashion-flow"


@dataclass(frozen=True)
class TrainConfig:
    """One training job. Steps count optimizer updates; batch_size is per worker.

    Attributes:
        workdir: the work folder of the embedded default (the SQLite MLflow store, pictures).
        verbose: more output: flowray's DEBUG lines, and Ray's own (Ray Train's line per report,
            Ray Data's execution plans) and MLflow's INFO lines.
        sync_every: the worker reads the steps' figures (bits/dim, gradient norm, skipped) from
            the device once every N steps, and at every log, evaluation and checkpoint step;
            between reads the device runs ahead of the host. The non-finite guard and, with
            several workers, the max_minutes check act at those reads, so they may act up to
            N - 1 steps late.
    """

    model: FlowConfig = field(default_factory=FlowConfig)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    run: RunSettings = field(default_factory=RunSettings)
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)
    storage: StorageConfig = field(default_factory=StorageConfig)
    workdir: str = field(default_factory=default_workdir)
    batch_size: int = 64
    max_steps: int = 2000
    max_minutes: float | None = None  # stop (with a final evaluation) after this wall time
    eval_every: int = 500
    eval_seed: int = 0  # keyed dequantization seed: same images + seed = same bits/dim anywhere
    eval_batch_size: int = 500
    checkpoint_every: int = 500
    log_every: int = 50
    sync_every: int = 10
    seed: int = 0
    init_images: int = 512  # images for the data-dependent ActNorm initialisation
    max_nonfinite_steps: int = 20  # consecutive non-finite losses before the run stops
    sample_temperature: float = 0.7
    # "bf16": the coupling conditioners run under bfloat16 autocast; the log-dets, the loss,
    # evaluation, checkpoints and shipped models stay float32.
    precision: Precision = "fp32"
    # torch.compile the training step (eager, said in one line, if compiling fails). Off by
    # default: compiling costs minutes at start.
    compile: bool = False
    verbose: bool = False

    def __post_init__(self) -> None:
        cadences = ("eval_every", "checkpoint_every", "log_every", "sync_every")
        check_at_least(self, 1, "batch_size", "max_steps", *cadences)
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes: expected > 0, found {self.max_minutes}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return from_dict(cls, data)
