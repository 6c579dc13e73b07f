"""Keyed noise, scheme splitmix64-v2: fixed numbers per (seed, key, pixel), whatever the batch,
order or device; uniform; and the scheme travels with the model, so old models (mt19937-v1)
score exactly as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from flowmodel import Flow, FlowConfig, bits_per_dim_from_log_prob, build_flow, dequantize
from pipeline.model import splitmix
from pipeline.model.artifact import CONFIG_FILE, SCHEME_KEY, FlowPayload, load_flow, save_flow
from pipeline.model.likelihood import keyed_bits_per_dim, predict_frame
from pipeline.model.noise import (
    MT19937_V1,
    NOISE_SCHEME,
    SPLITMIX64_V2,
    key_seeds64,
    keyed_noise,
    noise_scheme_of,
)
from tests.pipeline.device_audit import AUDIT_DEVICE, AuditDevice, AuditTensor

KEYS = [f"shard-{i % 3}/img-{i}" for i in range(11)]
WORD = (1 << 64) - 1


def splitmix_reference(seed: int, index: int) -> float:
    """u[seed, index] in plain Python integers: the definition (pipeline.model.splitmix's
    docstring) the vector versions follow."""
    z = (seed + (index + 1) * splitmix.GAMMA) & WORD
    z = ((z ^ (z >> 30)) * splitmix.MIX1) & WORD
    z = ((z ^ (z >> 27)) * splitmix.MIX2) & WORD
    z ^= z >> 31
    return (z >> 11) * 2.0**-53


def test_splitmix_matches_the_published_sequence() -> None:
    # SplitMix64 seeded 1234567: its first outputs as published with the reference code
    # (Rosetta Code, "Pseudo-random numbers/Splitmix64", from Vigna's splitmix64.c).
    published = [6457827717110365317, 3203168211198807973, 9817491932198370423]
    expected = [(word >> 11) * 2.0**-53 for word in published]
    assert [splitmix_reference(1234567, j) for j in range(3)] == expected
    seeds = np.array([1234567], dtype=np.uint64)
    assert splitmix.uniform_float64_numpy(seeds, 3)[0].tolist() == expected
    on_torch = splitmix.uniform_float64(torch.tensor([1234567]), 3)
    assert on_torch[0].tolist() == expected


def test_keyed_noise_known_answers() -> None:
    # Fixed forever: a change here changes every v2 model's scores (make a new scheme instead).
    assert hex(int(key_seeds64(["a"], 0)[0])) == "0xe78fefb8fac5f39d"
    noise = keyed_noise(["a", "shard-3/img-1"], (784,), seed=0, scheme=SPLITMIX64_V2)
    assert noise[0, [0, 1, 783]].tolist() == [
        0.38865530928516545,
        0.30567091678451397,
        0.1502819695042501,
    ]
    other = keyed_noise(["shard-3/img-1"], (784,), seed=7, scheme=SPLITMIX64_V2)
    assert other[0, [0, 1, 783]].tolist() == [
        0.6846228555079271,
        0.272856942941472,
        0.7208416483418805,
    ]


@pytest.mark.parametrize("count", [1, 7, 784, 4099, 12288])
def test_numpy_and_torch_give_the_same_bits(count: int) -> None:
    """The CPU's numpy path and the torch path (what a GPU runs) agree, in blocks or not; seeds
    cover the sign bit and the wrap-around of the counter additions."""
    seeds = np.array([0, 1, 2**63 - 1, 2**63, 2**64 - 1, *key_seeds64(KEYS, 3)], dtype=np.uint64)
    from_numpy = splitmix.uniform_float64_numpy(seeds, count)
    from_torch = splitmix.uniform_float64(torch.from_numpy(seeds.view(np.int64).copy()), count)
    assert from_numpy.dtype == np.float64 and from_numpy.shape == (len(seeds), count)
    assert np.array_equal(from_numpy, from_torch.numpy())
    for row, index in ((2, count - 1), (4, 0), (5, count // 2)):
        assert from_numpy[row, index] == splitmix_reference(int(seeds[row]), index)


def test_same_key_same_noise_in_any_batch_and_order() -> None:
    alone = {key: keyed_noise([key], (3, 8, 8), seed=5) for key in KEYS}
    shuffled = list(reversed(KEYS)) + ["other"] * 40  # several blocks, another order
    batch = keyed_noise(shuffled, (3, 8, 8), seed=5)
    for i, key in enumerate(shuffled[: len(KEYS)]):
        assert torch.equal(batch[i], alone[key][0])
    assert not torch.equal(alone[KEYS[0]], alone[KEYS[1]])
    assert not torch.equal(keyed_noise(KEYS[:1], (3, 8, 8), seed=6), alone[KEYS[0]])


def test_noise_on_another_device_is_the_cpu_noise() -> None:
    on_cpu = keyed_noise(KEYS, (3, 4, 4), seed=7)
    with AuditDevice():
        on_device = keyed_noise(KEYS, (3, 4, 4), seed=7, device=AUDIT_DEVICE)
    assert isinstance(on_device, AuditTensor) and on_device.shape == (len(KEYS), 3, 4, 4)
    assert torch.equal(on_device.cpu(), on_cpu)


def test_noise_is_uniform() -> None:
    """10^5 draws over 100 keys: mean 1/2, variance 1/12, and a KS test against U(0, 1)."""
    u = keyed_noise([f"k{i}" for i in range(100)], (1000,), seed=0).flatten().numpy()
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    assert stats.kstest(u, "uniform").pvalue > 0.001
    # Neighbouring pixels and neighbouring keys are uncorrelated.
    grid = u.reshape(100, 1000)
    assert abs(np.corrcoef(grid[:, :-1].ravel(), grid[:, 1:].ravel())[0, 1]) < 0.02
    assert abs(np.corrcoef(grid[:-1].ravel(), grid[1:].ravel())[0, 1]) < 0.02


CONFIG = FlowConfig(image_shape=(1, 8, 8), levels=2, steps_per_level=1, hidden_channels=8)


@pytest.fixture(scope="module")
def flow() -> Flow:
    torch.manual_seed(0)
    model = build_flow(CONFIG)
    model.initialize(torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8))
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (len(KEYS), 1, 8, 8), generator=torch.Generator().manual_seed(1))


def test_new_flows_save_the_current_scheme(flow: Flow, tmp_path: Path) -> None:
    assert noise_scheme_of(flow) == NOISE_SCHEME == SPLITMIX64_V2
    directory = save_flow(flow, tmp_path / "model")
    assert json.loads((directory / CONFIG_FILE).read_text())[SCHEME_KEY] == SPLITMIX64_V2
    assert noise_scheme_of(load_flow(directory)) == SPLITMIX64_V2
    payload = FlowPayload.from_flow(load_flow(directory))
    assert payload.noise_scheme == SPLITMIX64_V2
    assert noise_scheme_of(payload.load()) == SPLITMIX64_V2


def test_an_old_model_scores_exactly_as_before(
    flow: Flow, images: torch.Tensor, tmp_path: Path
) -> None:
    """A directory and a payload without a scheme are mt19937-v1 and give the v1 bits/dim (the
    per-key CPU generator's noise), not the v2 ones."""
    directory = save_flow(flow, tmp_path / "old")
    config = json.loads((directory / CONFIG_FILE).read_text())
    del config[SCHEME_KEY]  # as saved before schemes were recorded
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    old = load_flow(directory)
    assert noise_scheme_of(old) == MT19937_V1
    v1_noise = torch.stack(
        [
            torch.rand((1, 8, 8), dtype=torch.float64, generator=torch.Generator().manual_seed(s))
            for s in (int(w) >> 1 for w in key_seeds64(KEYS, 3))
        ]
    )
    # keyed_bits_per_dim as it was before schemes: dequantize with that noise, then log p.
    y = dequantize(images.byte(), CONFIG.n_bits, noise=v1_noise, dtype=torch.float32)
    with torch.no_grad():
        expected = bits_per_dim_from_log_prob(flow.log_prob(y, check=False), CONFIG)
    found = keyed_bits_per_dim(old, KEYS, images.byte(), seed=3)
    assert torch.equal(found, expected)
    assert torch.equal(found, keyed_bits_per_dim(flow, KEYS, images.byte(), 3, MT19937_V1))
    assert not torch.equal(found, keyed_bits_per_dim(flow, KEYS, images.byte(), 3))
    legacy = FlowPayload(config=CONFIG.to_dict(), weights=FlowPayload.from_flow(flow).weights)
    frame = predict_frame(legacy.load(), images.byte().numpy(), KEYS, seed=3, draws=2)
    v1_frame = predict_frame(flow, images.byte().numpy(), KEYS, seed=3, draws=2, scheme=MT19937_V1)
    assert frame.equals(v1_frame)


def test_v2_scores_do_not_depend_on_the_batch(flow: Flow, images: torch.Tensor) -> None:
    together = keyed_bits_per_dim(flow, KEYS, images.byte(), seed=3)
    order = list(reversed(range(len(KEYS))))
    reversed_batch = keyed_bits_per_dim(
        flow, [KEYS[i] for i in order], images.byte()[order], seed=3
    )
    assert torch.allclose(reversed_batch.flip(0), together, rtol=0, atol=1e-5)
    for i in (0, 5):
        alone = keyed_bits_per_dim(flow, KEYS[i : i + 1], images.byte()[i : i + 1], seed=3)
        assert torch.allclose(alone[0], together[i], rtol=0, atol=1e-5)


def test_an_unknown_scheme_is_refused(flow: Flow, tmp_path: Path) -> None:
    directory = save_flow(flow, tmp_path / "model")
    config = json.loads((directory / CONFIG_FILE).read_text())
    (directory / CONFIG_FILE).write_text(json.dumps({**config, SCHEME_KEY: "philox-v9"}))
    with pytest.raises(ValueError, match="noise scheme: expected one of mt19937-v1, .*'philox-v9'"):
        load_flow(directory)
