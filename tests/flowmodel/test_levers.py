"""The model levers of issue 16: variational dequantization (cells preserved, float32 edges, exact
round trips, cell masses unchanged, identity at init) and the gated residual conditioner; and the
default config still building exactly the parameters saved models have.

The generic layer and whole-flow suites (brute-force Jacobians, inverses, cancelling log-dets) run
over both levers through the LAYERS and TINY_FLOWS tables of test_bijections.py.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from flowmodel import FlowConfig, build_flow, dequantize
from flowmodel.dequantization import VariationalDequantization
from tests.flowmodel.test_bijections import perturb


def tiny_variational(conditioner: str) -> FlowConfig:
    """A 1x8x8 two-level flow with variational dequantization and the given conditioner."""
    return FlowConfig(
        image_shape=(1, 8, 8),
        levels=2,
        steps_per_level=2,
        hidden_channels=8,
        conditioner=conditioner,
        dequantization="variational",
    )


def skewed_dequantizer(n_bits: int = 8, bins: int = 8) -> VariationalDequantization:
    """A dequantizer whose last bin takes almost all of u: g(eps) runs close to 1 early, where
    float32 rounding of x + u would leave the cell."""
    layer = VariationalDequantization(1, n_bits, bins=bins)
    with torch.no_grad():
        layer.net[-1].bias.view(1, bins)[0, -1] = 12.0
    perturb(layer.net, scale=0.3)
    return layer


def edge_inputs(n_bits: int = 8) -> torch.Tensor:
    """float32 y at every cell's lower edge, just above it, mid-cell and at the last float below
    the upper edge, for x = 0, 1, L/2 and L - 1: [1, 1, 4, 16]."""
    levels = 2**n_bits
    x = torch.tensor([0.0, 1.0, levels / 2, levels - 1.0])
    upper = torch.nextafter((x + 1) / levels, torch.zeros(4))
    columns = [x / levels, (x + 1e-6) / levels, (x + 0.5) / levels, upper]
    return torch.stack(columns, dim=1).reshape(1, 1, 4, 4).repeat(1, 1, 1, 4)


def test_dequantizer_preserves_cells_and_round_trips_in_float32_at_cell_edges() -> None:
    torch.manual_seed(0)
    layer = skewed_dequantizer()
    y = torch.cat(
        [edge_inputs(), torch.rand(7, 1, 4, 16, generator=torch.Generator().manual_seed(0))]
    )
    with torch.no_grad():
        y_out, ld_forward = layer(y)
        y_back, ld_inverse = layer.inverse(y_out)
    assert torch.equal(torch.floor(y_out * 256), torch.floor(y * 256))
    assert (y_out < 1).all() and (y_out >= 0).all()
    assert (y_back - y).abs().max() < 1e-5
    # Log-dets cancel except where eps sits exactly on a kink of g (eps = 0.5 in row 0): x + u
    # rounds by an ulp to either side of it, and the inverse takes the neighbouring bin's slope
    # there, a set of float32 measure zero. Row 0 is all edges; the random rows must cancel.
    assert (ld_forward + ld_inverse)[1:].abs().max() < 1e-3
    # Skewed indeed: most elements move by a good part of a cell.
    assert ((y_out - y).abs() * 256).median() > 0.2


def test_dequantizer_starts_as_the_identity() -> None:
    """Equal bin widths: g(eps) = eps, log-det 0, so a new variational flow scores exactly as the
    uniform one with the same other parameters."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(1))
    base = FlowConfig(image_shape=(1, 8, 8), levels=2, steps_per_level=2, hidden_channels=8)
    uniform = build_flow(base)
    uniform.initialize(images)
    perturb(uniform, scale=0.05)
    variational = build_flow(FlowConfig(**{**base.to_dict(), "dequantization": "variational"}))
    missing, unexpected = variational.load_state_dict(uniform.state_dict(), strict=False)
    assert all(k.startswith("dequantizer.") for k in missing) and missing and not unexpected
    with torch.no_grad():
        expected = uniform.bits_per_dim(images, noise=noise)
        got = variational.bits_per_dim(images, noise=noise)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_g_maps_each_cell_onto_itself_and_its_slope_integrates_to_one() -> None:
    """Per element, g(.; x) is increasing with g(0) = 0 and g(1) = 1, so it maps [0, 1] onto itself
    and q(u | x) = 1 / g'(eps) is a normalised density: with the brute-force Jacobian tests, this is
    the whole argument that each integer cell keeps its mass (see flowmodel.dequantization).
    g' is constant on each of the K bins, so the midpoint rule with nodes inside bins is exact."""
    torch.manual_seed(0)
    layer = skewed_dequantizer(n_bits=3, bins=4).double()
    x = torch.randint(0, 8, (2, 1, 3, 3), generator=torch.Generator().manual_seed(0)).double()
    n = 64  # nodes per cell, 16 per bin
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    eps = torch.cat([ends[:1], (torch.arange(n, dtype=torch.float64) + 0.5) / n, ends[1:]])
    # All nodes in one batch: (n + 2) x the 2 images.
    y = ((x[None] + eps[:, None, None, None, None]) / 8).reshape(-1, 1, 3, 3).requires_grad_()
    y_out, _ = layer(y)
    # g acts element-wise given x (its Jacobian is diagonal; test_bijections checks the full
    # one), so the gradient of the sum is g' per element.
    (slope,) = torch.autograd.grad(y_out.sum(), y)
    u_all = (y_out.detach() * 8).reshape(len(eps), *x.shape) - x
    slope_all = slope.reshape(len(eps), *x.shape)
    assert torch.allclose(u_all[0], torch.zeros_like(u_all[0]), atol=1e-12)
    assert torch.allclose(u_all[-1], torch.ones_like(u_all[-1]), atol=1e-12)
    assert (u_all[1:] > u_all[:-1]).all()
    integral = slope_all[1:-1].mean(0)  # the midpoint rule over eps in [0, 1], per element
    assert torch.allclose(integral, torch.ones_like(integral), atol=1e-12)
    assert slope_all.max() / slope_all.min() > 10  # far from the identity


@pytest.mark.parametrize("conditioner", ["conv", "gated_resnet"])
def test_variational_flow_samples_in_range_and_scores_its_samples(conditioner: str) -> None:
    torch.manual_seed(0)
    config = tiny_variational(conditioner)
    flow = build_flow(config)
    perturb(flow, scale=0.05)
    samples = flow.sample(8, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (8, 1, 8, 8) and samples.dtype == torch.uint8
    bpd = flow.bits_per_dim(samples, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(bpd).all()
    # The flow's input is the uniform dequantization; the inverse gives back y in its cell.
    y = dequantize(samples, 8, torch.Generator().manual_seed(2))
    with torch.no_grad():
        y_back, _ = flow.inverse(flow(y)[0])
    assert torch.equal(torch.floor(y_back * 256), torch.floor(y * 256))
    assert (y_back - y).abs().max() < 1e-4


@pytest.mark.parametrize(
    ("config", "count", "digest"),
    [
        # sha256 of "name:shape" lines of state_dict, computed at commit e0e57c2 (before the
        # conditioner and dequantization fields existed): saved models keep loading.
        (FlowConfig(), 260, "c16376e3ea69a50813cb0b1e367ad8d80da2f7f5a1780b4d4e734ff96cf27fa9"),
        (
            FlowConfig(
                image_shape=(3, 32, 32),
                levels=3,
                mask="checkerboard",
                coupling="additive",
                coupling_depth=3,
            ),
            438,
            "958adf654681d599fff791fa07224af689088bd74306429165267587d3320732",
        ),
    ],
)
def test_default_configs_build_the_same_parameters_as_before(
    config: FlowConfig, count: int, digest: str
) -> None:
    state = build_flow(config).state_dict()
    text = "\n".join(f"{name}:{tuple(value.shape)}" for name, value in state.items())
    assert len(state) == count
    assert hashlib.sha256(text.encode()).hexdigest() == digest


def test_gated_resnet_conditioner_is_wider_than_conv_at_the_same_width() -> None:
    """The gated blocks add parameters (a sanity check that the option builds something else), and
    a gated coupling still starts as the identity."""
    conv = build_flow(FlowConfig(steps_per_level=2))
    gated = build_flow(FlowConfig(steps_per_level=2, conditioner="gated_resnet"))
    count = lambda flow: sum(p.numel() for p in flow.parameters())  # noqa: E731
    assert count(gated) > count(conv)
    y = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    coupling = gated.steps[0][0].coupling
    x = gated.squeeze(gated.preprocess(y)[0])[0]
    with torch.no_grad():
        z, logdet = coupling(x)
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(2))


def test_unknown_conditioner_is_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match="conditioner: expected one of"):
        FlowConfig.from_dict({"conditioner": "transformer"})
    with pytest.raises(ValueError, match="dequantization: expected one of"):
        FlowConfig.from_dict({"dequantization": "importance"})


@pytest.mark.parametrize("conditioner", ["conv", "gated_resnet"])
def test_every_parameter_of_the_new_options_gets_a_gradient(conditioner: str) -> None:
    """The zero-initialised last layers block gradients to the layers before them at step 0 by
    design, so take one optimiser step first; then every parameter, the dequantizer's included,
    must get a non-zero gradient from the bits/dim."""
    torch.manual_seed(0)
    config = tiny_variational(conditioner)
    flow = build_flow(config)
    images = torch.randint(0, 256, (16, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    images = images.to(torch.uint8)
    flow.initialize(images)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        flow.bits_per_dim(images, generator=torch.Generator().manual_seed(1)).mean().backward()
        optimizer.step()
    names = [name for name, _ in flow.named_parameters()]
    assert any(name.startswith("dequantizer.") for name in names)
    for name, param in flow.named_parameters():
        assert param.grad is not None and param.grad.abs().max() > 0, name
