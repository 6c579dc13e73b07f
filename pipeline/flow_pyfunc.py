"""The MLflow pyfunc flavour of a flow: `predict(uint8 images) -> log-likelihood and bits/dim`.

Logged as "models from code" (this module's path is the model's code, FlowPyfunc is instantiated
by `jobs`-free code at load), so nothing is pickled: the weights are the safetensors artifact.
"""

from __future__ import annotations

import math
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

__all__ = ["FlowPyfunc", "predict_frame"]


def predict_frame(
    flow: Any, images: np.ndarray, keys: list[str], seed: int, draws: int
) -> pd.DataFrame:
    """Per image: log-likelihood in nats (of the discrete image, log P(x) bound) and bits/dim.

    With draws > 1, the K dequantizations are averaged in probability space (log-mean-exp), a
    tighter bound than one draw (Ho et al. 2019, Flow++, section 3.1 / importance weighting).
    """
    from pipeline.train_step import keyed_bits_per_dim

    # On the flow's device (a GPU scoring actor); keyed noise is made on the CPU and moved.
    tensor = torch.from_numpy(np.ascontiguousarray(images)).to(flow.top_prior.mu.device)
    dims, ln2 = flow.config.dims, math.log(2)
    per_draw = []
    for draw in range(draws):
        draw_keys = keys if draw == 0 else [f"{key}#{draw}" for key in keys]
        per_draw.append(keyed_bits_per_dim(flow, draw_keys, tensor, seed).double().cpu())
    # log P(x) = -bpd * D * ln 2 per draw; average probabilities across draws.
    log_likelihood = torch.logsumexp(torch.stack(per_draw) * (-dims * ln2), 0) - math.log(draws)
    bits = -log_likelihood / (dims * ln2)
    return pd.DataFrame(
        {"key": keys, "log_likelihood": log_likelihood.numpy(), "bits_per_dim": bits.numpy()}
    )


class FlowPyfunc(mlflow.pyfunc.PythonModel):
    """Input: uint8 images [B, C, H, W] as an ndarray, or a dict {"image": ndarray, "key": [...]}
    (keys fix the dequantization noise; default keys are row positions). Params: seed (0),
    draws (1). Output: a DataFrame with key, log_likelihood (nats) and bits_per_dim."""

    def load_context(self, context: Any) -> None:
        from pipeline.model_store import load_flow

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
