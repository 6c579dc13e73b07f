"""One generic suite over every layer and the whole flow: invertibility, log-det against the
brute-force Jacobian, forward/inverse log-dets cancelling. A new layer is one entry in LAYERS."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from flowmodel import (
    ActNorm,
    Bijection,
    Coupling,
    FlowConfig,
    FlowStep,
    GaussianSplit,
    InvConv1x1,
    LearnedPrior,
    Logit,
    Shift,
    Squeeze,
    build_flow,
)
from flowmodel.dequantization import VariationalDequantization

SHAPE = (4, 4, 4)  # (C, H, W) of the inputs each layer gets


def perturb(module: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Move every parameter away from its (often identity) init so the checks are not trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))


LAYERS: dict[str, Callable[[], Bijection]] = {
    "shift": Shift,
    "logit": lambda: Logit(0.05),
    "logit-1e-6": lambda: Logit(1e-6),
    "squeeze": Squeeze,
    "actnorm": lambda: ActNorm(SHAPE[0]),
    "invconv": lambda: InvConv1x1(SHAPE[0]),
    "coupling-channel-affine-0": lambda: Coupling(SHAPE[0], 8, 2, "channel", 0, True),
    "coupling-channel-affine-1": lambda: Coupling(SHAPE[0], 8, 2, "channel", 1, True),
    "coupling-channel-additive": lambda: Coupling(SHAPE[0], 8, 1, "channel", 0, False),
    "coupling-checker-affine-0": lambda: Coupling(SHAPE[0], 8, 2, "checkerboard", 0, True),
    "coupling-checker-affine-1": lambda: Coupling(SHAPE[0], 8, 1, "checkerboard", 1, True),
    "coupling-checker-additive": lambda: Coupling(SHAPE[0], 8, 1, "checkerboard", 1, False),
    "coupling-gated-resnet-channel": lambda: Coupling(
        SHAPE[0], 8, 2, "channel", 0, True, conditioner="gated_resnet"
    ),
    "coupling-gated-resnet-checker": lambda: Coupling(
        SHAPE[0], 8, 1, "checkerboard", 1, True, conditioner="gated_resnet"
    ),
    "variational-dequantization": lambda: VariationalDequantization(SHAPE[0], n_bits=3, bins=4),
    "gaussian-split": lambda: GaussianSplit(SHAPE[0]),
    "gaussian-split-clamped": lambda: GaussianSplit(SHAPE[0], clamp=0.5),
    "learned-prior": lambda: LearnedPrior(SHAPE),
    "flow-step": lambda: FlowStep(
        SHAPE[0], FlowConfig(image_shape=(1, 8, 8), hidden_channels=8), 1
    ),
}


def layer_input(name: str, batch: int = 3, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    if name in ("logit", "logit-1e-6", "variational-dequantization"):  # their domain is (0, 1)
        return torch.rand(batch, *SHAPE, generator=generator, dtype=torch.float64) * 0.9 + 0.05
    return torch.randn(batch, *SHAPE, generator=generator, dtype=torch.float64)


def make_layer(name: str) -> Bijection:
    layer = LAYERS[name]().double()
    perturb(layer)
    return layer


def brute_force_logdet(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """log|det J| of fn at each sample, from the full autograd Jacobian in float64: [B]."""
    out = []
    for sample in x:
        jac = torch.autograd.functional.jacobian(lambda v: fn(v[None])[0].flatten(), sample)
        jac = jac.reshape(jac.shape[0], -1)  # (D_out, D_in)
        out.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_inverts_in_float64(name: str) -> None:
    layer, x = make_layer(name), layer_input(name)
    z, _ = layer(x)
    x_back, _ = layer.inverse(z)
    assert torch.allclose(x_back, x, atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_logdet_matches_autograd_jacobian(name: str) -> None:
    layer, x = make_layer(name), layer_input(name)
    _, logdet = layer(x)
    assert logdet.shape == (x.shape[0],)
    expected = brute_force_logdet(lambda v: layer(v)[0], x)
    assert torch.allclose(logdet, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_forward_and_inverse_logdets_cancel(name: str) -> None:
    layer, x = make_layer(name), layer_input(name)
    z, ld_forward = layer(x)
    _, ld_inverse = layer.inverse(z)
    assert ld_inverse.shape == (x.shape[0],)
    assert torch.allclose(ld_forward + ld_inverse, torch.zeros_like(ld_forward), atol=1e-9)


def test_layers_are_not_trivial_after_perturbation() -> None:
    """Guards the suite itself: a perturbed layer really changes its input and has a log-det."""
    for name in (
        "actnorm",
        "invconv",
        "coupling-channel-affine-0",
        "coupling-checker-affine-0",
        "coupling-gated-resnet-channel",
        "variational-dequantization",
        "gaussian-split",
    ):
        layer, x = make_layer(name), layer_input(name)
        z, logdet = layer(x)
        assert (z - x).abs().max() > 1e-2, name
        assert logdet.abs().max() > 1e-3, name


def test_squeeze_is_a_permutation_of_2x2_patches() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    z, _ = Squeeze()(x)
    assert z.shape == (1, 4, 2, 2)
    # channel 0 holds the top-left pixel of each 2x2 patch, channel 3 the bottom-right
    assert z[0, 0].tolist() == [[0.0, 2.0], [8.0, 10.0]]
    assert z[0, 3].tolist() == [[5.0, 7.0], [13.0, 15.0]]


TINY_FLOWS = {
    "logit-channel-affine": FlowConfig((2, 4, 4), 2, 2, 8, 2, "affine", "channel", 8, "logit"),
    "shift-checker-affine": FlowConfig((2, 4, 4), 2, 2, 8, 1, "affine", "checkerboard", 8, "shift"),
    "logit-channel-additive-5bit": FlowConfig(
        (2, 4, 4), 2, 2, 8, 1, "additive", "channel", 5, "logit"
    ),
    "gated-resnet-checker": FlowConfig(
        (2, 4, 4), 2, 2, 8, 2, mask="checkerboard", conditioner="gated_resnet"
    ),
    "variational-logit-5bit": FlowConfig(
        (2, 4, 4), 2, 2, 8, 1, n_bits=5, dequantization="variational"
    ),
    "variational-gated-shift": FlowConfig(
        (2, 4, 4),
        2,
        2,
        8,
        1,
        preprocess="shift",
        conditioner="gated_resnet",
        dequantization="variational",
    ),
}


def tiny_flow(config: FlowConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    flow = build_flow(config).double()
    perturb(flow, scale=0.1)
    return flow


def tiny_images(config: FlowConfig, batch: int = 2, seed: int = 3) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(
        0, 256, (batch, *config.image_shape), generator=generator, dtype=torch.uint8
    )


@pytest.mark.parametrize("name", sorted(TINY_FLOWS))
def test_whole_flow_logdet_matches_autograd_jacobian(name: str) -> None:
    config = TINY_FLOWS[name]
    flow = tiny_flow(config)
    y = flow_input(config)
    z, logdet = flow(y)
    assert z.shape == (y.shape[0], config.dims) and logdet.shape == (y.shape[0],)
    expected = brute_force_logdet(lambda v: flow(v)[0], y)
    assert torch.allclose(logdet, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(TINY_FLOWS))
def test_whole_flow_inverts_and_logdets_cancel(name: str) -> None:
    config = TINY_FLOWS[name]
    flow = tiny_flow(config)
    y = flow_input(config)
    z, ld_forward = flow(y)
    y_back, ld_inverse = flow.inverse(z)
    assert torch.allclose(y_back, y, atol=1e-9, rtol=0)
    assert torch.allclose(ld_forward + ld_inverse, torch.zeros_like(ld_forward), atol=1e-9)


def flow_input(config: FlowConfig) -> Tensor:
    from flowmodel import dequantize

    return dequantize(
        tiny_images(config), config.n_bits, torch.Generator().manual_seed(4), torch.float64
    )


def test_the_clamped_split_prior_stays_finite_where_the_unbounded_one_overflows() -> None:
    # A prior conv that extrapolates to log_sigma -1744 (measured on a Fashion-MNIST test image
    # after 3,000 steps at lr 2e-3): unbounded, exp(-log_sigma) overflows float32.
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for clamp in (None, 8.0):
        split = GaussianSplit(SHAPE[0], clamp=clamp)
        with torch.no_grad():
            split.prior.bias[SHAPE[0] - SHAPE[0] // 2 :] = -1744.0  # the log_sigma half
        outputs[clamp] = split(x)
    z, logdet = outputs[None]
    assert not torch.isfinite(z).all()
    z, logdet = outputs[8.0]
    assert torch.isfinite(z).all() and torch.isfinite(logdet).all()
    # Pinned near -8 (8 tanh(-218) = -8 to float32): the log-det is +8 per transformed element.
    transformed = (SHAPE[0] - SHAPE[0] // 2) * SHAPE[1] * SHAPE[2]
    assert torch.allclose(logdet, torch.full((2,), 8.0 * transformed))


def test_logit_with_a_small_alpha_is_exact_in_float32_in_the_top_cell() -> None:
    """With MAF's alpha 1e-6, 1 - p in the top cell is as small as 1e-6: computed as 1 - p in float32
    it was off by up to a few percent there. Against float64 on the same float32 inputs."""
    u = torch.tensor([0.0, 0.5, 0.99, 0.999, 0.9999, 0.99999], dtype=torch.float32)
    y = ((255 + u) / 256).view(1, 1, 1, -1)  # the top cell, as dequantize computes it
    alpha = 1e-6
    z, ldj = Logit(alpha)(y)
    y64 = y.double()
    p, q = alpha + (1 - 2 * alpha) * y64, alpha + (1 - 2 * alpha) * (1 - y64)
    expected_z = torch.log(p) - torch.log(q)
    expected_ldj = (math.log(1 - 2 * alpha) - torch.log(p) - torch.log(q)).sum()
    assert torch.allclose(z.double(), expected_z, rtol=1e-6, atol=0)
    assert float(ldj) == pytest.approx(float(expected_ldj), rel=1e-6)
    # The old formula's error at the last point, so this test can tell them apart.
    p32 = alpha + (1 - 2 * alpha) * y
    old_ldj = float((math.log(1 - 2 * alpha) - torch.log(p32) - torch.log1p(-p32)).sum())
    assert abs(old_ldj - float(expected_ldj)) > 1e-3
