"""The flow as a density model: exact bits/dim, normalisation, sampling, state, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowmodel import FlowConfig, build_flow, dequantize, standard_normal_log_prob


def test_config_rejects_sizes_not_divisible_by_two_to_the_levels() -> None:
    with pytest.raises(ValueError, match=r"divisible by 2\*\*levels = 8 .*H=28, W=28"):
        FlowConfig(image_shape=(1, 28, 28), levels=3)


def test_config_round_trips_through_json() -> None:
    import json

    config = FlowConfig(image_shape=(3, 32, 32), levels=3, mask="checkerboard", n_bits=5)
    again = FlowConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert again.image_shape == (3, 32, 32)


def test_config_names_unknown_keys_and_wrong_types() -> None:
    with pytest.raises(ValueError, match="unknown key hiden_channels"):
        FlowConfig.from_dict({"hiden_channels": 3})
    with pytest.raises(ValueError, match="levels: expected an integer, found '2'"):
        FlowConfig.from_dict({"levels": "2"})
    with pytest.raises(ValueError, match="mask: expected one of"):
        FlowConfig.from_dict({"mask": "diagonal"})


@pytest.mark.parametrize(
    ("shape", "levels"), [((1, 28, 28), 2), ((3, 32, 32), 3), ((3, 64, 64), 4)]
)
def test_supported_image_shapes_run_both_ways(shape: tuple[int, int, int], levels: int) -> None:
    config = FlowConfig(image_shape=shape, levels=levels, steps_per_level=2, hidden_channels=16)
    flow = build_flow(config)
    images = torch.randint(0, 256, (2, *shape), dtype=torch.uint8)
    flow.initialize(images)
    bpd = flow.bits_per_dim(images)
    assert bpd.shape == (2,) and torch.isfinite(bpd).all()
    samples = flow.sample(2, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, *shape) and samples.dtype == torch.uint8


@pytest.mark.parametrize("preprocess", ["logit", "shift"])
def test_bits_per_dim_at_initialisation_is_the_analytic_value(preprocess: str) -> None:
    """Before initialize() every layer is the identity up to a rotation, and the priors are N(0, I),
    so log p(y) is the standard normal density of the preprocessed y plus its Jacobian."""
    config = FlowConfig(image_shape=(1, 8, 8), levels=2, steps_per_level=2, preprocess=preprocess)
    flow = build_flow(config).double()
    images = torch.randint(
        0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    noise = torch.rand(
        images.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    y = ((images.double() + noise) / 256).numpy().reshape(3, -1)
    if preprocess == "logit":
        a = config.logit_alpha
        p = a + (1 - 2 * a) * y
        x = np.log(p) - np.log1p(-p)
        log_jac = (np.log(1 - 2 * a) - np.log(p) - np.log1p(-p)).sum(1)
    else:
        x, log_jac = y - 0.5, 0.0
    log_p = (-0.5 * x**2 - 0.5 * math.log(2 * math.pi)).sum(1) + log_jac
    expected = -log_p / (64 * math.log(2)) + 8
    got = flow.bits_per_dim(images, noise=noise).detach().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_density_integrates_to_one() -> None:
    """A trained-looking (perturbed) flow on 1x2x2 images with a full logit (alpha = 0) is a density on
    (0, 1)^4, so it integrates to 1. The quadrature grid is uniform in t with y = sigmoid(t), which puts
    points where the mass is (near 0 and 1); the weight dy/dt = y (1 - y) per axis comes from the
    grid, not from the flow."""
    from tests.flowmodel.test_bijections import perturb

    torch.manual_seed(0)
    config = FlowConfig(
        image_shape=(1, 2, 2), levels=1, steps_per_level=2, hidden_channels=8, logit_alpha=0.0
    )
    flow = build_flow(config).double()
    perturb(flow, scale=0.2)
    n, bound = 36, 14.0
    t = torch.linspace(-bound, bound, n, dtype=torch.float64)
    step = float(t[1] - t[0])
    axis = torch.sigmoid(t)
    weight_axis = axis * (1 - axis) * step
    y = torch.cartesian_prod(axis, axis, axis, axis)  # (n^4, 4)
    weight = torch.cartesian_prod(*[weight_axis] * 4).prod(1)
    with torch.no_grad():
        density = torch.cat(
            [flow.log_prob(chunk.reshape(-1, 1, 2, 2)).exp() for chunk in y.split(100_000)]
        )
    integral = float((density * weight).sum())
    assert integral == pytest.approx(1.0, abs=0.01)


def test_float32_inverse_on_real_images_after_initialisation(fashion_mnist: torch.Tensor) -> None:
    torch.manual_seed(0)
    flow = build_flow(FlowConfig())
    flow.initialize(fashion_mnist[:256])
    y = dequantize(fashion_mnist[256:320], 8, torch.Generator().manual_seed(0))
    with torch.no_grad():
        z, ld_forward = flow(y)
        y_back, ld_inverse = flow.inverse(z)
    assert (y_back - y).abs().max() < 1e-4
    assert (ld_forward + ld_inverse).abs().max() < 1e-2 * (1 + ld_forward.abs().max())
    assert flow.initialized


def test_initialize_whitens_each_actnorm_input(fashion_mnist: torch.Tensor) -> None:
    flow = build_flow(FlowConfig(steps_per_level=2))
    assert not flow.initialized
    flow.initialize(fashion_mnist[:512])
    first = flow.steps[0][0].actnorm
    y = dequantize(fashion_mnist[:512], 8, torch.Generator().manual_seed(1))
    x, _ = flow.squeeze(flow.preprocess(y)[0])
    out, _ = first(x)
    assert out.mean(dim=(0, 2, 3)).abs().max() < 0.05
    assert (out.std(dim=(0, 2, 3)) - 1).abs().max() < 0.05


def test_sampling_then_scoring_is_consistent() -> None:
    """log p(x) of a sample equals log N(z) minus the inverse pass's log-det, and it maps back to z."""
    from tests.flowmodel.test_bijections import perturb

    torch.manual_seed(0)
    flow = build_flow(
        FlowConfig(image_shape=(1, 8, 8), levels=2, steps_per_level=2, hidden_channels=16)
    )
    perturb(flow, scale=0.05)
    z = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * 0.5
    with torch.no_grad():
        y, ld_inverse = flow.inverse(z)
        expected = standard_normal_log_prob(z) - ld_inverse
        assert torch.allclose(flow.log_prob(y), expected, atol=1e-3, rtol=1e-5)
        assert torch.allclose(flow(y)[0], z, atol=1e-4)


def test_sample_at_temperature_zero_is_deterministic() -> None:
    flow = build_flow(FlowConfig(image_shape=(1, 8, 8), levels=2, steps_per_level=2))
    a = flow.sample(4, temperature=0.0, generator=torch.Generator().manual_seed(0))
    b = flow.sample(4, temperature=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    c = flow.sample(4, temperature=1.0, generator=torch.Generator().manual_seed(0))
    d = flow.sample(4, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(c, d) and not torch.equal(a, c)


def test_five_bit_images_use_32_levels() -> None:
    config = FlowConfig(image_shape=(1, 8, 8), levels=2, steps_per_level=1, n_bits=5)
    flow = build_flow(config)
    samples = flow.sample(8, generator=torch.Generator().manual_seed(0))
    assert torch.all(samples % 8 == 0)
    images = torch.full((1, 1, 8, 8), 255, dtype=torch.uint8)
    # 255 >> 3 = 31, the top level: y stays in [31/32, 1)
    y = dequantize(images, 5, torch.Generator().manual_seed(0))
    assert y.min() >= 31 / 32 and y.max() < 1
    assert 0 < float(flow.bits_per_dim(images).detach()[0]) < 20


def test_gradients_reach_every_parameter(fashion_mnist: torch.Tensor) -> None:
    """Zero-initialised last layers block gradients to the conditioners at step 0 by design, so take
    one step first, then every parameter must get a non-zero gradient."""
    torch.manual_seed(0)
    flow = build_flow(FlowConfig(steps_per_level=2, hidden_channels=16))
    flow.initialize(fashion_mnist[:128])
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        flow.bits_per_dim(fashion_mnist[:32]).mean().backward()
        optimizer.step()
    for name, param in flow.named_parameters():
        assert param.grad is not None and param.grad.abs().max() > 0, name


def test_state_dict_round_trip_gives_identical_log_prob(fashion_mnist: torch.Tensor) -> None:
    from tests.flowmodel.test_bijections import perturb

    config = FlowConfig(steps_per_level=2, hidden_channels=16)
    flow = build_flow(config)
    flow.initialize(fashion_mnist[:128])
    perturb(flow, scale=0.01)
    fresh = build_flow(config)
    fresh.load_state_dict(flow.state_dict())
    assert fresh.initialized
    noise = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(
            flow.bits_per_dim(fashion_mnist[:16], noise=noise),
            fresh.bits_per_dim(fashion_mnist[:16], noise=noise),
        )


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.zeros(2, 1, 28, 28), "expected a torch.uint8 tensor, found torch.float32"),
        (
            torch.zeros(2, 28, 28, dtype=torch.uint8),
            r"expected shape \[B, 1, 28, 28\], found \[2, 28, 28\]",
        ),
        (
            torch.zeros(2, 3, 28, 28, dtype=torch.uint8),
            r"expected shape \[B, 1, 28, 28\], found \[2, 3, 28, 28\]",
        ),
        (np.zeros((2, 1, 28, 28), dtype=np.uint8), "expected a torch.uint8 tensor, found ndarray"),
    ],
)
def test_bad_images_raise_with_expected_and_found(bad: object, message: str) -> None:
    flow = build_flow(FlowConfig(steps_per_level=1))
    with pytest.raises(ValueError, match=message):
        flow.bits_per_dim(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        flow.initialize(bad)  # type: ignore[arg-type]


def test_out_of_range_y_is_rejected() -> None:
    flow = build_flow(FlowConfig(steps_per_level=1))
    with pytest.raises(ValueError, match=r"expected values in \[0, 1\).*found range \[0, 255\]"):
        flow.log_prob(torch.cat([torch.zeros(1, 1, 28, 28), torch.full((1, 1, 28, 28), 255.0)]))
