"""Per-image log-likelihood and bits/dim of uint8 images: keyed dequantization, K draws.

Shared by validation (pipeline.train.step), the scoring actors (pipeline.batch) and the MLflow
pyfunc model (pipeline.model.pyfunc). It imports torch, numpy and pandas only, so a scoring actor
starts without MLflow.

Devices: the keyed noise is one seeded CPU generator's draws per key. On the CPU it is drawn that
way; on a GPU, `pipeline.model.mersenne` computes the same generator for a whole chunk of keys at
once, bit for bit (a Python loop over keys ran at 17,000 images/s on the H200 box's CPU, a seventh
of the GPU's forward pass). The images are then dequantized in float64 and rounded once to the
flow's dtype; float64 addition and division round the same way everywhere, so y, the flow's input,
is the same numbers on any device. Only uint8 images cross to the GPU (from pinned memory,
asynchronously), in chunks that bound the memory of the int64 generator states.
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
from pipeline.model.mersenne import uniform_float64

__all__ = [
    "CHUNK_DIMS",
    "key_seeds",
    "keyed_bits_per_dim",
    "keyed_noise",
    "predict_frame",
    "to_device",
]

# Values of y per chunk on an accelerator (64 MiB of float32; 5,461 images of 3x32x32): large
# enough to fill a GPU, small enough for the generator's int64 words (272 MB at this size). On
# the CPU a batch is one chunk, as it always was (a conv's float sums can depend on the batch).
CHUNK_DIMS = 2**24


def key_seeds(keys: Sequence[str], seed: int) -> list[int]:
    """Each key's generator seed: 63 bits of sha256(f"{seed}:{key}")."""
    digests = (hashlib.sha256(f"{seed}:{key}".encode()).digest() for key in keys)
    return [int.from_bytes(digest[:8], "little") >> 1 for digest in digests]


def keyed_noise(
    keys: Sequence[str], shape: tuple[int, ...], seed: int, device: torch.device | None = None
) -> Tensor:
    """Dequantization noise u in [0, 1), one draw per image seeded by (seed, key): [B, *shape],
    float64, on `device` (the CPU by default).

    Validation, scoring and the logged model all dequantize this way, so an image gets the same
    bits/dim whatever batch, shard order, worker or device it lands on: per key, the numbers of
    torch.rand(shape, dtype=float64) from a CPU generator seeded with `key_seeds`.
    """
    seeds = key_seeds(keys, seed)
    if device is not None and torch.device(device).type != "cpu":
        on_device = torch.tensor(seeds, dtype=torch.int64).to(device)
        return uniform_float64(on_device, math.prod(shape)).reshape(len(keys), *shape)
    noise = torch.empty(len(keys), *shape, dtype=torch.float64)
    generator = torch.Generator()  # reseeded per key: the same numbers as a fresh one, cheaper
    for i, key_seed in enumerate(seeds):
        generator.manual_seed(key_seed)
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
    device. `images` may be on any device (they move to the flow's; see the module docstring)."""
    flow._check_images(images)
    device = flow.top_prior.mu.device
    on_cpu = device.type == "cpu"
    step = max(len(keys), 1) if on_cpu else max(1, CHUNK_DIMS // flow.config.dims)
    pieces = []
    for start in range(0, len(keys), step):
        chunk = to_device(images[start : start + step], device)
        noise = keyed_noise(keys[start : start + step], tuple(images.shape[1:]), seed, device)
        y = dequantize(chunk, flow.config.n_bits, noise=noise, dtype=flow._dtype())
        log_prob = flow.log_prob(y, check=False)  # y is dequantize's: in range
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
