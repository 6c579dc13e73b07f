"""Batch jobs over a trained model: bulk likelihood scoring (Parquet per shard, exactly once per
key) and sample generation, resolving the model the same way for both.

May import: flowmodel, pipeline.{model,data,tracking}, pipeline.{errors,storage,plots}.
"""

from __future__ import annotations

__all__: list[str] = []
