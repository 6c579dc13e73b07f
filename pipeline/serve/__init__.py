"""Online scoring on Ray Serve: `flowray serve --model models:/<name>@champion`.

    config      ServeConfig: what to serve, where, and how requests are batched
    requests    HTTP bodies (PNG/JPEG bytes, JSON uint8 arrays) to images and keys, within the
                byte and pixel limits (413 before a body over them is read)
    model       the served model: resolved by reference, scored with the batch scorer, and
                reloaded when its registry alias moves
    deployment  the Ray Serve deployment (FastAPI ingress, @serve.batch) and the application
    runner      start (model checked first) and stop the application on Ray Serve

The throughput suite is pipeline.bench.serving; the command is jobs/serve.py.

An answer is the score job's row for the same image: bits/dim, log-likelihood and the OOD score
come from pipeline.batch.scoring.actors.Scorer, so the two never drift apart.

May import: flowmodel, pipeline.batch (the scorer and the model resolver),
pipeline.{model,data,tracking}, pipeline.{errors,config,storage,plots,submission,local_ray}.
"""

from __future__ import annotations

__all__: list[str] = []
