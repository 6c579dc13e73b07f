"""Online scoring on Ray Serve: `flowray serve --model models:/<name>@champion`: config, requests
(HTTP bodies to images, within limits), model (resolved, scored, reloaded), deployment, runner.

An answer is the score job's row for the same image: the scores come from the score job's Scorer,
so the two never drift apart.

May import: flowmodel, pipeline.batch (the scorer and the model resolver),
pipeline.{model,data,tracking}, pipeline.{config,storage,plots,submission,local_ray}.
"""

from __future__ import annotations

__all__: list[str] = []
