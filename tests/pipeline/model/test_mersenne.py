"""The vectorised MT19937 gives, bit for bit, the numbers of torch's CPU generator, so keyed
dequantization noise drawn on a GPU is the noise the CPU draws."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.likelihood import keyed_noise
from pipeline.model.mersenne import uniform_float64
from pipeline.model.noise import MT19937_V1, key_seeds
from tests.pipeline.device_audit import AUDIT_DEVICE, AuditDevice, AuditTensor

SEEDS = [0, 1, 5489, 2**32 + 7, 2**63 - 1, 123_456_789_012_345, *key_seeds(["a", "b"], 3)]


@pytest.mark.parametrize("count", [1, 5, 311, 312, 313, 624, 625, 3072])
def test_uniform_float64_is_the_cpu_generators_rand(count: int) -> None:
    expected = torch.stack(
        [
            torch.rand(count, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            for seed in SEEDS
        ]
    )
    found = uniform_float64(torch.tensor(SEEDS, dtype=torch.int64), count)
    assert found.dtype == torch.float64 and found.shape == (len(SEEDS), count)
    assert torch.equal(found, expected)


def test_keyed_noise_on_another_device_is_the_cpu_noise() -> None:
    keys = [f"shard-3/img-{i}" for i in range(9)]
    on_cpu = keyed_noise(keys, (3, 4, 4), seed=7, scheme=MT19937_V1)
    with AuditDevice():
        on_device = keyed_noise(keys, (3, 4, 4), 7, AUDIT_DEVICE, MT19937_V1)
    assert isinstance(on_device, AuditTensor) and on_device.shape == (9, 3, 4, 4)
    assert torch.equal(on_device.cpu(), on_cpu)
