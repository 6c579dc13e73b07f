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
    """One suite: its module under pipeline.bench (imported only when it runs), what it measures."""

    module: str
    about: str
    in_all: bool = True  # run by `flowray bench all`


SUITES: dict[str, Suite] = {
    "quality": Suite("quality", "test bits/dim against normflows' Glow at equal time"),
    "training": Suite("training", "training images/s: in-process, Ray Train 1 and 2 workers"),
    "scoring": Suite("scoring", "Ray Data scoring against the same work in one process"),
    "sampling": Suite("sampling", "flowray sample against Flow.sample in-process"),
    "scaling": Suite("scaling", "scoring time and memory at growing sizes"),
    "io": Suite("shard_io", "shard write/read, foreign shards, listing; disk and S3"),
    "serving": Suite("serving", "flowray serve at 1, 8 and 64 concurrent clients"),
    "ood": Suite("ood", "OOD scores' AUROC and FPR95 on foreign image sets"),
    "gpu": Suite("gpu", "training, scoring, sampling, checkpoints on one GPU"),
    "ablation": Suite("ablation", "one training lever at a time against the preset", False),
    "step_phases": Suite("step_phases", "a training step's phases; plain torch DDP", False),
}
