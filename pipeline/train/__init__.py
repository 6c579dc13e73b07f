"""Training: the typed TrainConfig, the pure train/eval step, the Ray Train worker loop, the
driver behind `flowray train`, and checkpoints.

May import: flowmodel, pipeline.{model,data,tracking}, pipeline.{errors,storage,plots}.
"""

from __future__ import annotations

__all__: list[str] = []
