"""Flow.log_prob_levels: log p(y) split by level, each level against a brute-force Jacobian."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from flowmodel import Flow, FlowConfig, standard_normal_log_prob
from tests.flowmodel.test_bijections import (
    TINY_FLOWS,
    brute_force_logdet,
    flow_input,
    tiny_flow,
)

# The dequantizer and shift; the logit and three levels (each layer's own checks: test_bijections).
FLOWS = {
    "variational-gated-shift": TINY_FLOWS["variational-gated-shift"],
    "logit-three-levels": FlowConfig((1, 8, 8), 3, 1, 8, 1),
}


def level_maps(flow: Flow) -> list:
    """Level l as its own map: input -> (kept half, eps_l) in one tensor; level 0 starts at y
    (dequantizer and preprocessing first), the last level ends with the top prior."""

    def level(index: int):
        def run(x: Tensor) -> Tensor:
            if index == 0:
                if flow.config.dequantization == "variational":
                    x, _ = flow.dequantizer(x)
                x, _ = flow.preprocess(x)
            x, _ = flow.squeeze(x)
            for step in flow.steps[index]:
                x, _ = step(x)
            last = index == len(flow.steps) - 1
            x, _ = flow.top_prior(x) if last else flow.splits[index](x)
            return x

        return run

    return [level(index) for index in range(len(flow.steps))]


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_each_level_is_its_latent_density_plus_its_brute_force_log_det(name: str) -> None:
    flow = tiny_flow(FLOWS[name])
    y = flow_input(FLOWS[name])
    log_prob, levels = flow.log_prob_levels(y)
    assert levels.shape == (len(y), FLOWS[name].levels)
    x = y
    for index, run in enumerate(level_maps(flow)):
        out = run(x)
        last = index == len(flow.steps) - 1
        n_keep = 0 if last else flow.splits[index].n_keep
        eps = out[:, n_keep:].flatten(1)
        expected = standard_normal_log_prob(eps) + brute_force_logdet(run, x)
        torch.testing.assert_close(levels[:, index], expected, atol=1e-6, rtol=0)
        x = out[:, :n_keep]
    torch.testing.assert_close(levels.sum(1), log_prob, atol=1e-9, rtol=0)


def test_log_prob_of_the_levels_is_log_prob_bit_for_bit() -> None:
    config = FlowConfig((1, 8, 8), levels=2, steps_per_level=2, hidden_channels=8)
    flow = tiny_flow(config).float()
    y = flow_input(config).float()
    with torch.no_grad():
        log_prob, levels = flow.log_prob_levels(y)
        assert torch.equal(log_prob, flow.log_prob(y))
    torch.testing.assert_close(levels.sum(1), log_prob, atol=1e-3, rtol=1e-6)
