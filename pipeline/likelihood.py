"""Per-image log-likelihood and bits/dim of uint8 images, with K dequantization draws.

Shared by the scoring actors and the MLflow pyfunc model; it imports torch and pandas only, so a
scoring actor starts without MLflow.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.train_step import keyed_bits_per_dim

__all__ = ["predict_frame"]


def predict_frame(
    flow: Any, images: np.ndarray, keys: list[str], seed: int, draws: int
) -> pd.DataFrame:
    """Per image: log-likelihood in nats (of the discrete image, log P(x) bound) and bits/dim.

    With draws > 1, the K dequantizations are averaged in probability space (log-mean-exp), a
    tighter bound than one draw (Ho et al. 2019, Flow++, section 3.1 / importance weighting).
    """
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
