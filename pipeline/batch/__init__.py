"""Batch jobs over a trained model: bulk likelihood scoring (Parquet per shard, exactly once per
key) and sample generation, resolving the model the same way for both.

    resolve          model reference -> flow, payload for actors, name and version (both jobs)
    scoring/         score(): plan -> actors -> collect -> report (its __init__ lists the modules)
    top              the least likely images of an output, in bounded memory
    sampling         generate(): Ray tasks draw chunks; the MLflow run

May import: flowmodel, pipeline.batch.scoring, pipeline.{model,data,tracking},
pipeline.{config,storage,plots,submission,local_ray}.
"""

from __future__ import annotations

__all__: list[str] = []
