"""What a scoring job is asked (ScoreConfig), what it did (ScoreResult), and how it refuses
(ScoreError). `pipeline.batch.scoring.job` runs it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from flowmodel.errors import FlowrayError
from flowmodel.typed import check_at_least, check_required
from pipeline.storage import StorageConfig


class ScoreError(FlowrayError, RuntimeError):
    """Scoring cannot run as asked; the message says what was expected and what was found."""


@dataclass(frozen=True)
class ScoreConfig:
    """One scoring job. `model`, `input` and `output` are required; the rest has defaults.

    Attributes:
        model: models:/<name>@<alias>, models:/<name>/<version>, runs:/<id>/<path> or a local
            model directory.
        input: a prepared split, `<data>/<split>`, or WebDataset shards scored in place: a brace
            pattern, a prefix of *.tar or a list file (local or s3://; pipeline.data.inputs).
        output: a prefix (local or s3://); files go under model=<name>/version=<v>/.
        storage: S3 endpoint and region for input and output.
        batch_size: images per forward pass in an actor.
        actors: size of the scoring actor pool; 0 = one per CPU (or GPU) of the cluster, less one
            CPU left for reading.
        cpus_per_actor: Ray CPUs of each actor.
        gpus_per_actor: Ray GPUs of each actor (> 0 scores on CUDA).
        read_concurrency: at most this many read tasks at once (None: Ray Data decides).
        draws: dequantization draws K per image, averaged in probability space.
        seed: dequantization seed; the same meaning as training's eval_seed, so scoring reproduces
            the training job's validation bits/dim.
        on_error: an unreadable image is logged, counted and left out ("skip") or stops the job.
        least_likely: how many of the least likely images the summary grid shows.
        flag_quantile: an image is flagged (column `flagged`) when its ood_score is above this
            quantile of the model version's validation ood_score (its calibration).
        fail_on_drift: exit 5 (EXIT_DRIFT) when this run's drift verdict is at least this level
            ("off": never).
        tracking_uri: MLflow tracking URI (None: $MLFLOW_TRACKING_URI, else
            sqlite:///<workdir>/mlflow.db, workdir $FLOWRAY_WORKDIR or flowray-work).
        experiment: MLflow experiment of the summary run.
        log_to_mlflow: log the summary run (the files under _summary/ are written either way).
        single_writer: run on an output store that does not refuse a second create of one
            object (S3 If-None-Match ignored), which a probe at the start otherwise refuses: only
            when no other job writes to this output at the same time (a rerun still finds the
            files and settings there; two jobs at once could overwrite each other's).
    """

    model: str
    input: str
    output: str
    storage: StorageConfig = field(default_factory=StorageConfig)
    batch_size: int = 256
    actors: int = 0
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    read_concurrency: int | None = None
    draws: int = 1
    seed: int = 0
    on_error: Literal["skip", "fail"] = "skip"
    least_likely: int = 32
    flag_quantile: float = 0.95
    fail_on_drift: Literal["off", "suspected", "detected"] = "off"
    tracking_uri: str | None = None
    experiment: str = "flowray-scoring"
    log_to_mlflow: bool = True
    single_writer: bool = False

    def __post_init__(self) -> None:
        check_required(self, "model", "input", "output")
        check_at_least(self, 1, "batch_size")
        if self.actors < 0:
            raise ValueError(f"actors: expected >= 0 (0 = auto), found {self.actors}")
        check_at_least(self, 1, "draws")
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ValueError(
                f"cpus_per_actor > 0 and gpus_per_actor >= 0 expected, found "
                f"{self.cpus_per_actor} and {self.gpus_per_actor}"
            )
        check_at_least(self, 0, "least_likely")
        if not 0 < self.flag_quantile < 1:
            raise ValueError(f"flag_quantile: expected in (0, 1), found {self.flag_quantile}")


@dataclass(frozen=True)
class ScoreResult:
    """What a scoring run did. Statistics cover the images scored by this run."""

    model_name: str
    model_version: str
    output: str  # <output>/model=<name>/version=<v>
    shards_total: int
    shards_already_done: int
    shards_written: tuple[str, ...]
    images_scored: int
    images_skipped: int  # bad images left out of the shards written (in their Parquet metadata)
    mean_bits_per_dim: float
    median_bits_per_dim: float
    p99_bits_per_dim: float
    images_per_second: float
    seconds: float
    summary_url: str | None
    mlflow_run_id: str | None
    # (shard, reason) of the shards that could not be read whole: no file, a rerun retries them.
    shards_left_out: tuple[tuple[str, str], ...] = ()
    images_left_out: int = 0  # images of those shards, by their manifest (foreign: samples met)
    input_kind: str = "prepared"  # "prepared" or "foreign" (pipeline.data.inputs)
    listing_seconds: float = 0.0  # the one listing of the input
    shards_new: int = 0  # shards with no file before this run
    shards_changed: int = 0  # foreign shards rewritten in place since their file was written
    files_written: tuple[str, ...] = ()  # this run's Parquet files (names under `output`)
    drift_level: str = "unknown"  # none | suspected | detected | unknown (no calibration)
    drift: str = ""  # the verdict's line: "drift: none (flagged 5.1% vs 5% expected, ...)"

    @property
    def status(self) -> Literal["complete", "partial", "failed"]:
        """complete: every shard has its file; partial: some shards were left out; failed:
        shards were left out and no shard of the split has a file (nothing could be scored)."""
        if not self.shards_left_out:
            return "complete"
        if self.shards_written or self.shards_already_done:
            return "partial"
        return "failed"

    def line(self) -> str:
        """The one-line report a job prints at the end."""
        listed = f" (listed in {self.listing_seconds:.2f} s)"
        if self.shards_already_done == self.shards_total:
            return (
                f"nothing to score: all {self.shards_already_done}/{self.shards_total} shards of "
                f"model={self.model_name} version={self.model_version} already at {self.output}"
                f"{listed}"
            )
        left_out = ""
        if self.shards_left_out:
            left_out = (
                f", {len(self.shards_left_out)} shards ({self.images_left_out:,} images) left out"
            )
        return (
            f"scored {self.images_scored:,} images ({len(self.shards_written)} shards written, "
            f"{self.shards_already_done} already done{left_out}, {self.images_skipped} images "
            f"skipped) with {self.model_name} v{self.model_version} at "
            f"{self.images_per_second:,.0f} images/s; bits/dim mean {self.mean_bits_per_dim:.4f} "
            f"median {self.median_bits_per_dim:.4f} p99 {self.p99_bits_per_dim:.4f} -> {self.output}"
            f"; {self.shards_new} new and {self.shards_changed} rewritten shards were due"
            f"{listed}"
        )

    def left_out_lines(self) -> list[str]:
        """One line per shard left out: `left out <shard>: <reason>`."""
        return [f"left out {shard}: {reason}" for shard, reason in self.shards_left_out]
