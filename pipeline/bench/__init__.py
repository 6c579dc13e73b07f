"""Benchmarks behind `flowray bench <suite>`: one harness (`harness`: local Ray, S3 on loopback,
the preset model, Fashion-MNIST, threads, timing, tables) and one module per suite, each with a
typed `Settings` (what `--set key=value` changes), `SMOKE` (the seconds-long sizes) and
`measure(settings, run) -> Result`. `SUITES` below is the table `jobs.bench` runs from.

May import flowmodel and everything in pipeline; never jobs. Nothing outside bench/ and
jobs/bench.py imports it. The GPU (`gpu`) and ablation suites import no Ray, MLflow, webdataset
or s3fs, so that they run on a bare PyTorch machine.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SUITES", "Suite"]


@dataclass(frozen=True)
class Suite:
    """One suite: its module (imported only when it runs) and what it measures."""

    module: str
    about: str
    in_all: bool = True  # run by `flowray bench all`


SUITES: dict[str, Suite] = {
    "quality": Suite(
        "pipeline.bench.quality", "test bits/dim against normflows' Glow at equal time"
    ),
    "training": Suite(
        "pipeline.bench.training", "training images/s: in-process, Ray Train 1 and 2 workers"
    ),
    "scoring": Suite(
        "pipeline.bench.scoring", "Ray Data scoring against the same work in one process"
    ),
    "sampling": Suite("pipeline.bench.sampling", "flowray sample against Flow.sample in-process"),
    "scaling": Suite("pipeline.bench.scaling", "scoring time and memory at growing sizes"),
    "io": Suite(
        "pipeline.bench.shard_io", "shard write/read, foreign shards, listing; disk and S3"
    ),
    "serving": Suite("pipeline.bench.serving", "flowray serve at 1, 8 and 64 concurrent clients"),
    "ood": Suite("pipeline.bench.ood", "OOD scores' AUROC and FPR95 on foreign image sets"),
    "gpu": Suite("pipeline.bench.gpu", "training, scoring, sampling, checkpoints on one GPU"),
    "ablation": Suite(
        "pipeline.bench.ablation", "one training lever at a time against the preset", False
    ),
    "step_phases": Suite(
        "pipeline.bench.step_phases", "a training step's phases; plain torch DDP", False
    ),
}
