"""Mixed precision: bf16 runs the coupling conditioners under autocast and nothing else; the
log-dets, priors, logit and the density stay float32, and the setting is not part of the state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flowmodel import Coupling, FlowConfig, GaussianSplit, build_flow

CONFIG = FlowConfig(image_shape=(3, 8, 8), levels=2, steps_per_level=2, hidden_channels=16)


def busy_flow() -> torch.nn.Module:
    """A flow whose conditioners and priors are not at their zero init (as after training)."""
    torch.manual_seed(0)
    flow = build_flow(CONFIG)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    flow.initialize(images, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for module in flow.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.normal_(0, 0.05)
    return flow


def y_batch() -> torch.Tensor:
    return torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_bf16_runs_the_conditioner_convolutions_and_nothing_else_in_bfloat16() -> None:
    flow = busy_flow().set_precision("bf16")
    dtypes: dict[str, set[torch.dtype]] = {"conditioner": set(), "prior": set()}

    def record(kind: str):
        return lambda module, args, output: dtypes[kind].add(output.dtype)

    for module in flow.modules():
        if isinstance(module, Coupling):
            for conv in module.net.modules():
                if isinstance(conv, nn.Conv2d):
                    conv.register_forward_hook(record("conditioner"))
        if isinstance(module, GaussianSplit):
            module.prior.register_forward_hook(record("prior"))
    z, logdet = flow(y_batch())
    assert dtypes == {"conditioner": {torch.bfloat16}, "prior": {torch.float32}}
    assert z.dtype == logdet.dtype == torch.float32
    assert flow.log_prob(y_batch()).dtype == torch.float32


def test_bf16_bits_per_dim_are_close_to_fp32_but_not_equal() -> None:
    flow = busy_flow()
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    noise = torch.rand(8, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fp32 = flow.bits_per_dim(images, noise=noise)
        bf16 = flow.set_precision("bf16").bits_per_dim(images, noise=noise)
    gap = (bf16 - fp32).abs().max().item()
    assert 0 < gap < 0.02, gap  # bf16 keeps 8 bits of mantissa in the conditioner only


def test_bf16_stays_invertible_because_both_directions_see_the_same_conditioner_input() -> None:
    flow = busy_flow().set_precision("bf16")
    y = y_batch()
    with torch.no_grad():
        z, logdet = flow(y)
        back, inverse_logdet = flow.inverse(z)
    assert (back - y).abs().max().item() < 1e-4
    assert (logdet + inverse_logdet).abs().max().item() < 1e-2


def test_precision_is_a_setting_not_state() -> None:
    flow = busy_flow()
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    flow.set_precision("bf16")
    assert flow.precision == "bf16"
    after = flow.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    fresh = build_flow(CONFIG)
    fresh.load_state_dict(after)
    assert fresh.precision == "fp32"
    assert flow.set_precision("fp32").precision == "fp32"
    with pytest.raises(
        ValueError, match=r"precision: expected one of \['fp32', 'bf16'\], found 'fp16'"
    ):
        flow.set_precision("fp16")  # type: ignore[arg-type]
