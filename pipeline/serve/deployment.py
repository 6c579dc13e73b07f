"""The Ray Serve deployment of a flow: a FastAPI ingress with batched scoring.

    GET  <prefix>/health   {"reference", "model", "version", "image_shape"}: what answers now
    POST <prefix>/score    an encoded image or JSON pixels (pipeline.serve.requests) ->
                           {"predictions": [{"key", "log_likelihood", "bits_per_dim",
                             "png_bits_per_dim", "ood_score", "model", "version", "batch_size"}]}

A body is read within the limits (pipeline.serve.requests), then parsed and decoded in one of
`decode_threads` threads, so a large image never holds the event loop. Images of concurrent
requests share one forward pass in `score_batch` (@serve.batch), which runs in a thread, so the
replica keeps accepting requests while torch computes.

Strict JSON has no infinity or NaN, which a score can be for an image far from the data: they are
answered as the strings "Infinity", "-Infinity" and "NaN", which Python's float() and
JavaScript's Number() read back.
"""

# No `from __future__ import annotations`: FastAPI reads the route parameters' annotations at
# run time (a string "Request" that Ray Serve's ingress wrapper cannot resolve becomes a
# required query parameter named `request`).
import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from pipeline.serve.config import ServeConfig
from pipeline.serve.model import ModelHolder
from pipeline.serve.requests import BadRequest, ScoreItem, media_type, parse_request, read_body

api = FastAPI(title="flowray", description="log-likelihood, bits/dim and OOD score of images")


@serve.deployment
@serve.ingress(api)
class FlowScoring:
    def __init__(self, config: ServeConfig) -> None:
        import mlflow

        mlflow.set_tracking_uri(config.tracking_uri)  # resolved by the driver
        self.holder = ModelHolder(config.model, config.seed, config.draws, config.reload_interval_s)
        self.config = config
        self.decoder = ThreadPoolExecutor(
            config.decode_threads, thread_name_prefix="flowray-decode"
        )
        self.score_batch.set_max_batch_size(config.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(config.batch_wait_ms / 1000)

    @api.get("/health")
    def health(self) -> dict[str, Any]:
        model = self.holder.current
        return {
            "reference": model.reference,
            "model": model.name,
            "version": model.version,
            "image_shape": list(model.image_shape),
        }

    @api.post("/score")
    async def score(self, request: Request, key: str | None = None) -> JSONResponse:
        shape = self.holder.current.image_shape
        try:
            mime = media_type(request.headers.get("content-type", ""))
            body = await read_body(request, mime, self.config)
            loop = asyncio.get_running_loop()
            items = await loop.run_in_executor(
                self.decoder, parse_request, body, mime, shape, key, self.config
            )
        except BadRequest as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        predictions = await asyncio.gather(*(self.score_batch(item) for item in items))
        return JSONResponse({"predictions": predictions})

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def score_batch(self, items: list[ScoreItem]) -> list[dict[str, Any]]:
        model = self.holder.current  # one model for the whole batch, even if a reload lands
        return await asyncio.to_thread(model.score, items)

    def __del__(self) -> None:
        if hasattr(self, "holder"):
            self.holder.stop()
        if hasattr(self, "decoder"):
            self.decoder.shutdown(wait=False)


def build_app(config: ServeConfig) -> Any:
    """The Ray Serve application of `config` (a bound deployment), for `serve.run`."""
    return FlowScoring.options(
        num_replicas=config.replicas,
        max_ongoing_requests=config.ongoing_requests,
        ray_actor_options={"num_cpus": config.cpus_per_replica},
        logging_config={"enable_access_log": config.access_log},
    ).bind(config)
