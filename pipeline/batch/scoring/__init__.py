"""Bulk likelihood scoring: any input -> Parquet, one file per shard, exactly once per key.

    job       score(): plan -> actors -> collect -> report, read top to bottom
    config    ScoreConfig (what a job is asked), ScoreResult (what it did), ScoreError
    actors    the Ray Data side: read the pending shards, score them on an actor pool
    output    per-shard Parquet written once complete; the settings file; output names
    report    streaming statistics, summary files beside the outputs, the MLflow summary run

Submodules are imported by name (`from pipeline.batch.scoring.job import score`); this package
imports nothing itself.

May import: flowmodel, pipeline.batch (the model resolver), pipeline.{model,data,tracking},
pipeline.{config,storage,plots,submission,local_ray}.
"""

from __future__ import annotations

__all__: list[str] = []
