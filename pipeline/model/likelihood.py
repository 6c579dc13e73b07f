"""Per-image log-likelihood and bits/dim of uint8 images: keyed dequantization, K draws.

Shared by validation (pipeline.train.step), the scoring actors (pipeline.batch) and the MLflow
pyfunc model (pipeline.model.pyfunc). It imports torch, numpy and pandas only, so a scoring actor
starts without MLflow.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from flowmodel import Flow

__all__ = ["keyed_bits_per_dim", "keyed_noise", "predict_frame"]


def keyed_noise(keys: Sequence[str], shape: tuple[int, ...], seed: int) -> Tensor:
    """Dequantization noise u in [0, 1), one draw per image seeded by (seed, key): [B, *shape].

    Validation, scoring and the logged model all dequantize this way, so an image gets the same
    bits/dim whatever batch, shard order or worker it lands in.
    """
    noise = torch.empty(len(keys), *shape, dtype=torch.float64)
    for i, key in enumerate(keys):
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        noise[i] = torch.rand(shape, generator=generator, dtype=torch.float64)
    return noise


@torch.no_grad()
def keyed_bits_per_dim(flow: Flow, keys: Sequence[str], images: Tensor, seed: int) -> Tensor:
    """Per-image bits/dim with keyed dequantization noise (see keyed_noise): [B]."""
    noise = keyed_noise(keys, tuple(images.shape[1:]), seed)
    return flow.bits_per_dim(images, noise=noise)


def predict_frame(
    flow: Flow, images: np.ndarray, keys: list[str], seed: int, draws: int
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
