"""Training: `flowray train`'s driver, the Ray Train worker loop around a Ray-free core (config,
step, ema, core, distributed, loop_state), what it reports, checkpoints, resume and data order.

May import: flowmodel, pipeline.{model,data,tracking},
pipeline.{config,storage,plots,submission,local_ray}.
"""

from __future__ import annotations

__all__: list[str] = []
