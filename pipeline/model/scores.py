"""The per-image scores of a flow, one definition for scoring, serving and calibration.

    log_likelihood     log P(x) in nats of the discrete image (keyed dequantization, K draws;
                       pipeline.model.likelihood.predict_levels, which also splits it by level)
    bits_per_dim       -log2 P(x) / D
    png_bits_per_dim   L(x) / D: the bits of x's PNG at maximum compression, a generic lossless
                       compressor's code length (the complexity term)
    ood_score          bits_per_dim - png_bits_per_dim + the final level's bits/dim; high =
                       unusual. The first term, how much worse the flow codes x than a generic
                       compressor (Serra et al. 2020, "Input complexity and out-of-distribution
                       detection with likelihood-based generative models"), flags foreign texture
                       or complexity; the coarsest level alone (Schirrmeister et al. 2020,
                       "Understanding anomaly detection with deep invertible networks through
                       hierarchies of distributions and features") flags foreign shapes, where
                       the first is fooled by the fine levels' reward for black backgrounds
                       (docs/ood.md has the table).

The scoring actors, serving and the calibration at registration all call `score_images`, so a
threshold chosen on one is valid on the others.
"""

from __future__ import annotations

import io
import math

import numpy as np

from flowmodel import Flow
from pipeline.model.likelihood import predict_levels

SCORE_COLUMNS = ("log_likelihood", "bits_per_dim", "png_bits_per_dim", "ood_score")
# ood_score's formula, by name: a calibration records it and judges only scores of the same one.
OOD_SCORE = "bits-png+final-level"


def max_png_bytes(image: np.ndarray) -> bytes:
    """uint8 [C, H, W] (C = 1 or 3) as PNG at maximum zlib compression (level 9)."""
    from PIL import Image

    pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)  # (H, W[, C])
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def add_png_complexity(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`batch` (with `image`, uint8 [B, C, H, W]) plus `png` (max-compression PNG bytes) and
    `png_bits_per_dim` (their size in bits per dimension): the complexity term, CPU work."""
    images = batch["image"]  # (B, C, H, W) uint8
    pngs = [max_png_bytes(image) for image in images]
    dims = int(np.prod(images.shape[1:]))
    return {
        **batch,
        "png": np.array(pngs, dtype=object),
        "png_bits_per_dim": np.array([8.0 * len(p) / dims for p in pngs]),
    }


def ood_score(
    bits_per_dim: np.ndarray, level_bits_per_dim: np.ndarray, png_bits_per_dim: np.ndarray
) -> np.ndarray:
    """bits_per_dim - png_bits_per_dim + the final level's bits/dim (see the module docstring):
    [B] from [B], [B, L] (`predict_levels`) and [B]."""
    return bits_per_dim - png_bits_per_dim + level_bits_per_dim[:, -1]


def score_images(
    flow: Flow,
    images: np.ndarray,
    keys: list[str],
    seed: int,
    draws: int,
    png_bits_per_dim: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """SCORE_COLUMNS of uint8 `images` [B, C, H, W], float64 arrays of length B, from one forward
    pass per draw; `png_bits_per_dim` when read tasks computed it already (`add_png_complexity`)."""
    if png_bits_per_dim is None:
        png_bits_per_dim = add_png_complexity({"image": images})["png_bits_per_dim"]
    log_likelihood, levels = predict_levels(flow, images, keys, seed, draws)
    bits = -log_likelihood / (flow.config.dims * math.log(2))
    png_bits = np.asarray(png_bits_per_dim, dtype=np.float64)
    return {
        "log_likelihood": log_likelihood,
        "bits_per_dim": bits,
        "png_bits_per_dim": png_bits,
        "ood_score": ood_score(bits, levels, png_bits),
    }
