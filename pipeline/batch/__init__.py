"""Batch jobs over a trained model: bulk likelihood scoring (Parquet per shard, exactly once per
key) and sample generation, resolving the model the same way for both.

    resolve          what both jobs share: model reference -> flow, payload, name and
                     version; the job's MLflow run
    scoring/         score(): plan -> actors -> collect -> report (its __init__ lists the modules)
    top              the least likely images of an output, and its drift verdict
    sampling         generate(): Ray tasks draw chunks, the driver writes shards in order

May import: flowmodel, pipeline.batch.scoring, pipeline.{model,data,tracking},
pipeline.{config,storage,plots,submission,local_ray}.
"""

from __future__ import annotations

__all__: list[str] = []
