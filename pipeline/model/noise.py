"""Keyed dequantization noise: u in [0, 1) per pixel, a function of (seed, key, pixel index).

Validation, scoring, the logged model and serving all dequantize this way, so an image gets the
same bits/dim whatever batch, shard order, worker or device it lands on. Scores depend on the
noise function, so the function is part of the model: a flow carries its scheme (`noise_scheme`),
saved with its weights (pipeline.model.artifact), and every consumer draws with the flow's.

Schemes:
- "mt19937-v1" (models saved before schemes were recorded): per key, the numbers of
  torch.rand(shape, dtype=float64) from a fresh CPU generator seeded with 63 bits of
  sha256(f"{seed}:{key}"). Building and seeding a generator costs about 10 us per key; on a GPU
  `pipeline.model.mersenne` computes the same numbers for a whole chunk of keys.
- "splitmix64-v2" (new flows: `NOISE_SCHEME`): key seed = 64 bits of sha256(f"{seed}:{key}"),
  u[j] = SplitMix64's (j + 1)-th output for that seed (`pipeline.model.splitmix`): counter-based,
  so a batch is one vectorised computation with no per-key generator.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from flowmodel import Flow
from pipeline.model import mersenne, splitmix

MT19937_V1 = "mt19937-v1"
SPLITMIX64_V2 = "splitmix64-v2"
NOISE_SCHEMES = (MT19937_V1, SPLITMIX64_V2)
NOISE_SCHEME = SPLITMIX64_V2  # what new flows use; a model saved without a scheme is MT19937_V1


def check_noise_scheme(scheme: str) -> str:
    """`scheme` if it is one this code draws; otherwise a ValueError naming the known ones (a
    model from a newer flowray must not be scored with different noise)."""
    if scheme not in NOISE_SCHEMES:
        raise ValueError(
            f"noise scheme: expected one of {', '.join(NOISE_SCHEMES)}, found {scheme!r}"
        )
    return scheme


def noise_scheme_of(flow: Flow) -> str:
    """The flow's noise scheme: the one it was loaded with, or NOISE_SCHEME for a new flow."""
    return getattr(flow, "noise_scheme", NOISE_SCHEME)


def with_noise_scheme(flow: Flow, scheme: str) -> Flow:
    """`flow`, marked to draw its noise with `scheme` (a plain attribute: it follows the module
    through .to(), deepcopy and DDP's .module)."""
    flow.noise_scheme = check_noise_scheme(scheme)
    return flow


def key_seeds64(keys: Sequence[str], seed: int) -> np.ndarray:
    """splitmix64-v2's key seeds: uint64 [B], the first 8 bytes of sha256(f"{seed}:{key}") read
    little-endian."""
    digests = b"".join(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8] for key in keys)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def key_seeds(keys: Sequence[str], seed: int) -> list[int]:
    """mt19937-v1's per-key generator seeds: the top 63 of those 64 bits."""
    return [int(word) >> 1 for word in key_seeds64(keys, seed)]


def keyed_noise(
    keys: Sequence[str],
    shape: tuple[int, ...],
    seed: int,
    device: torch.device | None = None,
    scheme: str = NOISE_SCHEME,
) -> Tensor:
    """Dequantization noise u in [0, 1), one draw per image seeded by (seed, key): [B, *shape],
    float64, on `device` (the CPU by default), drawn with `scheme` (see the module docstring)."""
    on_cpu = device is None or torch.device(device).type == "cpu"
    count = math.prod(shape)
    if check_noise_scheme(scheme) == SPLITMIX64_V2:
        seeds = key_seeds64(keys, seed)
        if on_cpu:  # numpy: the same bits, faster on a CPU (pipeline.model.splitmix)
            noise = torch.from_numpy(splitmix.uniform_float64_numpy(seeds, count))
        else:
            on_device = torch.from_numpy(seeds.view(np.int64).copy()).to(device)
            noise = splitmix.uniform_float64(on_device, count)
    elif on_cpu:
        noise = torch.empty(len(keys), count, dtype=torch.float64)
        generator = torch.Generator()  # reseeded per key: the same numbers as a fresh one, cheaper
        for i, key_seed in enumerate(key_seeds(keys, seed)):
            generator.manual_seed(key_seed)
            torch.rand(count, generator=generator, dtype=torch.float64, out=noise[i])
    else:
        on_device = torch.tensor(key_seeds(keys, seed), dtype=torch.int64).to(device)
        noise = mersenne.uniform_float64(on_device, count)
    return noise.reshape(len(keys), *shape)
