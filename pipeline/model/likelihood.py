"""Per-image log-likelihood and bits/dim of uint8 images: keyed dequantization, K draws.

Shared by validation, the scoring actors and the MLflow pyfunc model; no MLflow here, so a
scoring actor starts without it.

Noise: `pipeline.model.noise.keyed_noise` with the flow's noise scheme, the same numbers on the CPU
and on a GPU. The images are then dequantized in float64 and rounded once to the flow's dtype;
float64 addition and division round the same way everywhere, so y, the flow's input, is the same
numbers on any device. Only uint8 images cross to the GPU (from pinned memory, asynchronously), in
chunks that bound the memory of the int64 generator states.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from flowmodel import Flow, bits_per_dim_from_log_prob, dequantize
from pipeline.model.noise import keyed_noise, noise_scheme_of

# Values of y per chunk on an accelerator (64 MiB of float32; 5,461 images of 3x32x32): large
# enough to fill a GPU, small enough for the generator's int64 words (272 MB at this size). On
# the CPU a batch is one chunk, so chunking never changes CPU scores (a conv's float sums can
# depend on the batch).
CHUNK_DIMS = 2**24


@torch.no_grad()
def keyed_bits_per_dim(
    flow: Flow, keys: Sequence[str], images: Tensor, seed: int, scheme: str | None = None
) -> Tensor:
    """Per-image bits/dim with keyed dequantization noise: [B], on the flow's device, for
    `images` on any device. The noise scheme is the flow's unless `scheme` names another."""
    return keyed_log_prob_levels(flow, keys, images, seed, scheme)[0]


@torch.no_grad()
def keyed_log_prob_levels(
    flow: Flow, keys: Sequence[str], images: Tensor, seed: int, scheme: str | None = None
) -> tuple[Tensor, Tensor]:
    """`keyed_bits_per_dim` [B] and log p(y) split by level (`Flow.log_prob_levels`, nats)
    [B, L], from one forward pass per chunk, on the flow's device."""
    flow._check_images(images)
    scheme = scheme or noise_scheme_of(flow)
    device = flow.top_prior.mu.device
    step = max(len(keys), 1) if device.type == "cpu" else max(1, CHUNK_DIMS // flow.config.dims)
    bits, levels, shape = [], [], tuple(images.shape[1:])
    for start in range(0, len(keys), step):
        chunk = images[start : start + step]
        if device.type == "cuda" and chunk.device.type == "cpu":
            chunk = chunk.pin_memory()  # copied asynchronously, ordered before its use on the GPU
        chunk = chunk.to(device, non_blocking=True)
        noise = keyed_noise(keys[start : start + step], shape, seed, device, scheme)
        y = dequantize(chunk, flow.config.n_bits, noise=noise, dtype=flow._dtype())
        log_prob, by_level = flow.log_prob_levels(y, check=False)  # y is dequantize's: in range
        bits.append(bits_per_dim_from_log_prob(log_prob, flow.config))
        levels.append(by_level)
    if not bits:
        return torch.empty(0, device=device), torch.empty(0, flow.config.levels, device=device)
    return torch.cat(bits), torch.cat(levels)


def predict_levels(
    flow: Flow,
    images: np.ndarray,
    keys: list[str],
    seed: int,
    draws: int,
    scheme: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per image: log-likelihood in nats (of the discrete image, log P(x) bound) [B], and the
    bits/dim of each level of the flow [B, L], both float64.

    With draws > 1, the K dequantizations are averaged in probability space (log-mean-exp), a
    tighter bound than one draw (Ho et al. 2019, Flow++, section 3.1 / importance weighting).
    The images stay on the CPU (where the noise is drawn); the flow may be on any device. The
    noise scheme is the flow's unless `scheme` names another.

    Level l's bits/dim is -c_l / (D_l ln 2) over its D_l latent dims, where c_l is its share of
    log P(x): its `Flow.log_prob_levels` term averaged over the K draws, less its dims' share of
    the cell volume, D_l n_bits ln 2. The log-mean-exp's gain over the mean of the draws (>= 0, a
    dequantization effect, per pixel) and float rounding go to level 0 with the other per-pixel
    terms, so the c_l sum to log P(x) and bits/dim is the D_l-weighted mean of the levels'.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(images))  # (B, C, H, W) uint8
    dims, ln2 = flow.config.dims, math.log(2)
    per_draw = []
    for draw in range(draws):
        draw_keys = keys if draw == 0 else [f"{key}#{draw}" for key in keys]
        bits, levels = keyed_log_prob_levels(flow, draw_keys, tensor, seed, scheme)
        per_draw.append(torch.cat([bits[:, None], levels], 1))  # (B, 1 + L)
    # One copy back (one device sync) for all draws; float64 for the log-mean-exp.
    stacked = torch.stack(per_draw).cpu().double()  # (draws, B, 1 + L)
    # log P(x) = -bpd * D * ln 2 per draw; average probabilities across draws.
    log_likelihood = torch.logsumexp(stacked[..., 0] * (-dims * ln2), 0) - math.log(draws)
    level_dims = torch.tensor([c * h * w for c, h, w in flow.latent_shapes], dtype=torch.float64)
    shares = stacked[..., 1:].mean(0) - level_dims * flow.config.n_bits * ln2
    shares[:, 0] += log_likelihood - shares.sum(1)  # (B, L)
    return log_likelihood.numpy(), (-shares / (level_dims * ln2)).numpy()


def predict_frame(
    flow: Flow,
    images: np.ndarray,
    keys: list[str],
    seed: int,
    draws: int,
    scheme: str | None = None,
) -> pd.DataFrame:
    """Per image: log-likelihood in nats (of the discrete image, log P(x) bound) and bits/dim;
    see `predict_levels`."""
    log_likelihood, _ = predict_levels(flow, images, keys, seed, draws, scheme)
    bits = -log_likelihood / (flow.config.dims * math.log(2))
    return pd.DataFrame({"key": keys, "log_likelihood": log_likelihood, "bits_per_dim": bits})
