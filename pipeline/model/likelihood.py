"""Per-image log-likelihood and bits/dim of uint8 images: keyed dequantization, K draws.

Shared by validation (pipeline.train.step), the scoring actors (pipeline.batch) and the MLflow
pyfunc model (pipeline.model.pyfunc). It imports torch, numpy and pandas only, so a scoring actor
starts without MLflow.

Devices: the keyed noise is drawn on the CPU (one seeded CPU generator per key) and the images are
dequantized where they are, in float64, then rounded once to the flow's dtype; float64 addition and
division round the same way on every device, so y, the flow's input, is the same numbers on any
device. Only y crosses to the flow's device (from pinned memory, asynchronously, for CUDA), in
chunks, so that the CPU draws the next chunk's noise while the GPU runs the last one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from flowmodel import Flow, bits_per_dim_from_log_prob, dequantize

__all__ = ["CHUNK_DIMS", "keyed_bits_per_dim", "keyed_noise", "predict_frame", "to_device"]

# Values of y per chunk on an accelerator (64 MiB of float32): large enough to fill a GPU, small
# enough that noise for the next chunk is drawn while this one runs. On the CPU a batch is one
# chunk, as it always was (a conv's float sums can depend on the batch size).
CHUNK_DIMS = 2**24


def keyed_noise(keys: Sequence[str], shape: tuple[int, ...], seed: int) -> Tensor:
    """Dequantization noise u in [0, 1), one draw per image seeded by (seed, key): [B, *shape].

    Validation, scoring and the logged model all dequantize this way, so an image gets the same
    bits/dim whatever batch, shard order, worker or device it lands on: the noise is always drawn
    on the CPU, in float64.
    """
    noise = torch.empty(len(keys), *shape, dtype=torch.float64)
    generator = torch.Generator()  # reseeded per key: the same numbers as a fresh one, cheaper
    for i, key in enumerate(keys):
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        generator.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        torch.rand(shape, generator=generator, dtype=torch.float64, out=noise[i])
    return noise


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """`tensor` on `device`; a CPU tensor bound for CUDA goes through pinned memory,
    asynchronously (the caller's next use of it on the GPU is ordered after the copy)."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@torch.no_grad()
def keyed_bits_per_dim(flow: Flow, keys: Sequence[str], images: Tensor, seed: int) -> Tensor:
    """Per-image bits/dim with keyed dequantization noise (see keyed_noise): [B], on the flow's
    device. `images` may be on any device; CPU batches are best (see the module docstring)."""
    flow._check_images(images)
    device = flow.top_prior.mu.device
    if device.type == "cpu":
        step = max(len(keys), 1)
    else:
        step = max(1, CHUNK_DIMS // flow.config.dims)
    pieces = []
    for start in range(0, len(keys), step):
        chunk = images[start : start + step]
        noise = keyed_noise(keys[start : start + step], tuple(images.shape[1:]), seed)
        y = dequantize(chunk, flow.config.n_bits, noise=noise, dtype=flow._dtype())
        log_prob = flow.log_prob(to_device(y, device), check=False)  # y is in range
        pieces.append(bits_per_dim_from_log_prob(log_prob, flow.config))
    if not pieces:
        return torch.empty(0, device=device)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def predict_frame(
    flow: Flow, images: np.ndarray, keys: list[str], seed: int, draws: int
) -> pd.DataFrame:
    """Per image: log-likelihood in nats (of the discrete image, log P(x) bound) and bits/dim.

    With draws > 1, the K dequantizations are averaged in probability space (log-mean-exp), a
    tighter bound than one draw (Ho et al. 2019, Flow++, section 3.1 / importance weighting).
    The images stay on the CPU (where the noise is drawn); the flow may be on any device.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(images))  # (B, C, H, W) uint8
    dims, ln2 = flow.config.dims, math.log(2)
    per_draw = []
    for draw in range(draws):
        draw_keys = keys if draw == 0 else [f"{key}#{draw}" for key in keys]
        per_draw.append(keyed_bits_per_dim(flow, draw_keys, tensor, seed))
    # One copy back (one device sync) for all draws; float64 for the log-mean-exp.
    stacked = torch.stack(per_draw).cpu().double()  # (draws, B)
    # log P(x) = -bpd * D * ln 2 per draw; average probabilities across draws.
    log_likelihood = torch.logsumexp(stacked * (-dims * ln2), 0) - math.log(draws)
    bits = -log_likelihood / (dims * ln2)
    return pd.DataFrame(
        {"key": keys, "log_likelihood": log_likelihood.numpy(), "bits_per_dim": bits.numpy()}
    )
