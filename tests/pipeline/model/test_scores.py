"""score_images and predict_levels: bits/dim unchanged, the levels sum to it, K draws combined as
documented, ood_score from its terms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowmodel import FlowConfig, build_flow, dequantize
from pipeline.model.likelihood import (
    keyed_bits_per_dim,
    keyed_noise,
    predict_frame,
    predict_levels,
)
from pipeline.model.noise import noise_scheme_of
from pipeline.model.scores import SCORE_COLUMNS, max_png_bytes, score_images
from tests.flowmodel.test_bijections import perturb

CONFIG = FlowConfig((1, 8, 8), levels=3, steps_per_level=1, hidden_channels=8)
KEYS = [f"image-{i}" for i in range(5)]


@pytest.fixture(scope="module")
def flow() -> torch.nn.Module:
    torch.manual_seed(0)
    flow = build_flow(CONFIG)
    perturb(flow, scale=0.1)
    return flow.eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    generator = np.random.default_rng(0)
    return generator.integers(0, 256, (len(KEYS), *CONFIG.image_shape), dtype=np.uint8)


def level_dims() -> np.ndarray:
    return np.array([c * h * w for c, h, w in build_flow(CONFIG).latent_shapes], dtype=float)


@pytest.mark.parametrize("draws", [1, 3])
def test_levels_are_a_split_of_bits_per_dim(flow, images, draws: int) -> None:
    log_likelihood, levels = predict_levels(flow, images, KEYS, seed=2, draws=draws)
    frame = predict_frame(flow, images, KEYS, seed=2, draws=draws)
    assert np.array_equal(frame["log_likelihood"].to_numpy(), log_likelihood)
    assert levels.shape == (len(KEYS), CONFIG.levels)
    weights = level_dims() / CONFIG.dims
    np.testing.assert_allclose(levels @ weights, frame["bits_per_dim"], rtol=0, atol=1e-12)


def test_one_draw_is_keyed_bits_per_dim(flow, images) -> None:
    bits = score_images(flow, images, KEYS, seed=2, draws=1)["bits_per_dim"]
    expected = keyed_bits_per_dim(flow, KEYS, torch.from_numpy(images), seed=2).double()
    np.testing.assert_allclose(bits, expected.numpy(), rtol=1e-6)


def test_coarse_levels_of_k_draws_are_the_mean_of_the_draws(flow, images) -> None:
    """Draw k's noise is keyed by "<key>#k" (draw 0: the key itself); every level but the finest
    is the mean over draws, the finest takes the log-mean-exp's gain over the mean."""
    _, together = predict_levels(flow, images, KEYS, seed=2, draws=3)
    alone = [
        predict_levels(flow, images, [f"{k}#{d}" if d else k for k in KEYS], 2, 1)[1]
        for d in range(3)
    ]
    np.testing.assert_allclose(together[:, 1:], np.mean(alone, 0)[:, 1:], rtol=0, atol=1e-9)
    # The gain is >= 0: the finest level of K draws is at most the mean of the draws' (bits).
    assert (together[:, 0] <= np.mean(alone, 0)[:, 0] + 1e-9).all()


def test_ood_score_is_complexity_corrected_bits_plus_the_final_level(flow, images) -> None:
    scores = score_images(flow, images, KEYS, seed=2, draws=1)
    assert set(scores) == set(SCORE_COLUMNS)
    png = np.array([8 * len(max_png_bytes(image)) / CONFIG.dims for image in images])
    np.testing.assert_array_equal(scores["png_bits_per_dim"], png)
    # The final level's bits/dim from the flow itself: -log p share / (D_L ln 2) + 8 bits.
    noise = keyed_noise(KEYS, CONFIG.image_shape, 2, scheme=noise_scheme_of(flow))
    y = dequantize(torch.from_numpy(images), 8, noise=noise)
    with torch.no_grad():
        _, levels = flow.log_prob_levels(y)
    final = -levels[:, -1].double().numpy() / (level_dims()[-1] * math.log(2)) + 8
    expected = scores["bits_per_dim"] - png + final
    np.testing.assert_allclose(scores["ood_score"], expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        scores["log_likelihood"], -scores["bits_per_dim"] * CONFIG.dims * math.log(2), rtol=1e-12
    )
