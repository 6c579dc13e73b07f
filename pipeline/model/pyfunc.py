"""The MLflow pyfunc flavour of a flow: `predict(uint8 images) -> log-likelihood and bits/dim`.

Logged as "models from code": MLflow runs pipeline/model/pyfunc_entry.py, which instantiates
FlowPyfunc, so nothing is pickled; the weights are the safetensors artifact (pipeline.model.artifact).
This is the one module of pipeline.model that imports MLflow: MLflow loads it itself.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np

from pipeline.model.artifact import load_flow
from pipeline.model.likelihood import predict_frame

__all__ = ["FlowPyfunc"]


class FlowPyfunc(mlflow.pyfunc.PythonModel):
    """Input: uint8 images [B, C, H, W] as an ndarray, or a dict {"image": ndarray, "key": [...]}
    (keys fix the dequantization noise; default keys are row positions). Params: seed (0),
    draws (1). Output: a DataFrame with key, log_likelihood (nats) and bits_per_dim."""

    def load_context(self, context: Any) -> None:
        self.flow = load_flow(context.artifacts["flow"])

    # No type hints here: MLflow turns predict's hints into a schema it then enforces.
    def predict(self, context, model_input, params=None):
        params = params or {}
        if isinstance(model_input, dict):
            images = (
                np.stack(list(model_input["image"]))
                if not isinstance(model_input["image"], np.ndarray)
                else model_input["image"]
            )
            keys = [str(k) for k in model_input.get("key", range(len(images)))]
        else:
            images = np.asarray(model_input)
            keys = [str(i) for i in range(len(images))]
        if images.dtype != np.uint8:
            raise ValueError(
                f"images: expected uint8 [B, C, H, W], found {images.dtype} {list(images.shape)}"
            )
        return predict_frame(
            self.flow, images, keys, int(params.get("seed", 0)), int(params.get("draws", 1))
        )
