"""Training: the typed TrainConfig (config), the pure train/eval step with the optimizer and its
warmup (step), the EMA of the weights (ema), the device-placed training core that the worker and
the GPU bench share (core) and its collectives (distributed), the loop's counting (loop_state), the
Ray Train worker loop (worker) and what it reports (reporting), the driver behind `flowray train`
(driver), what a rerun resumes from and whether its config may resume it (resume), the
training data's order as a function of (seed, epoch) and the epoch each plan is for (data_order),
and checkpoints (checkpoint, written and read on the CPU).

May import: flowmodel, pipeline.{model,data,tracking},
pipeline.{errors,config,storage,plots,submission,local_ray}.
"""

from __future__ import annotations

__all__: list[str] = []
