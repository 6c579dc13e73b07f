"""The model artifact: a flow saved to disk or packed into bytes comes back with the same weights,
so it gives the same log-likelihoods to the last bit; loading it needs neither Ray nor MLflow."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowmodel import Flow, FlowConfig, build_flow
from pipeline.model.artifact import CONFIG_FILE, WEIGHTS_FILE, FlowPayload, load_flow, save_flow

REPO = Path(__file__).resolve().parents[3]
CONFIG = FlowConfig(levels=2, steps_per_level=1, hidden_channels=8)


@pytest.fixture(scope="module")
def flow(fashion_mnist: torch.Tensor) -> Flow:
    """A flow whose every parameter differs from a fresh build: ActNorm fitted to real images,
    then every weight moved, so a load that drops any tensor changes log p."""
    torch.manual_seed(0)
    model = build_flow(CONFIG)
    model.initialize(fashion_mnist[:256])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def dequantized(fashion_mnist: torch.Tensor) -> torch.Tensor:
    """64 images dequantized once with fixed noise: y in [0, 1), [64, 1, 28, 28]."""
    noise = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    return (fashion_mnist[:64].float() + noise) / 256


@torch.no_grad()
def log_prob(model: Flow, y: torch.Tensor) -> torch.Tensor:
    return model.log_prob(y)


def test_disk_round_trip_gives_identical_log_prob(
    flow: Flow, dequantized: torch.Tensor, tmp_path: Path
) -> None:
    directory = save_flow(flow, tmp_path / "model")
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    loaded = load_flow(directory)
    assert loaded.config == flow.config and not loaded.training and loaded.initialized
    expected = log_prob(flow, dequantized)
    assert torch.equal(log_prob(loaded, dequantized), expected)
    # The check has teeth: a fresh flow of the same config scores these images differently.
    fresh = build_flow(CONFIG).eval()
    fresh.initialize((dequantized * 256).floor().to(torch.uint8))
    assert not torch.allclose(log_prob(fresh, dequantized), expected)


def test_bytes_round_trip_gives_identical_log_prob_after_pickling(
    flow: Flow, dequantized: torch.Tensor
) -> None:
    payload = FlowPayload.from_flow(flow)
    shipped = pickle.loads(pickle.dumps(payload))  # what Ray's object store does to it
    assert shipped == payload
    loaded = shipped.load()
    assert loaded.config == flow.config and not loaded.training
    assert torch.equal(log_prob(loaded, dequantized), log_prob(flow, dequantized))


def test_disk_and_bytes_hold_the_same_weights(flow: Flow, tmp_path: Path) -> None:
    from_disk = FlowPayload.from_flow(load_flow(save_flow(flow, tmp_path / "model")))
    in_memory = FlowPayload.from_flow(flow)
    assert from_disk.weights == in_memory.weights and from_disk.config == in_memory.config
    assert from_disk.digest() == in_memory.digest() and len(in_memory.digest()) == 12
    other = FlowPayload.from_flow(build_flow(CONFIG))
    assert other.digest() != in_memory.digest()


def test_loading_a_folder_without_weights_names_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text("{}")
    with pytest.raises(FileNotFoundError) as error:
        load_flow(tmp_path)
    message = str(error.value)
    assert f"expected {WEIGHTS_FILE} and {CONFIG_FILE}" in message
    assert f"missing {WEIGHTS_FILE}" in message and f"missing {WEIGHTS_FILE}," not in message


def test_artifact_and_likelihood_import_neither_ray_nor_mlflow() -> None:
    # Scoring actors and served models load flows through these two modules: neither needs Ray
    # or MLflow, and each costs seconds to import in every process.
    code = (
        "import sys, pipeline.model.artifact, pipeline.model.likelihood; "
        "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "[]"


def test_a_clamped_split_prior_survives_the_round_trip_and_old_files_load_unbounded(
    tmp_path: Path, fashion_mnist: torch.Tensor
) -> None:
    clamped = build_flow(FlowConfig(**{**CONFIG.to_dict(), "split_clamp": 8.0}))
    clamped.initialize(fashion_mnist[:64])
    saved = save_flow(clamped, tmp_path / "model")
    assert json.loads((saved / "flow_config.json").read_text())["split_clamp"] == 8.0
    assert [split.clamp for split in load_flow(saved).splits] == [8.0] * len(clamped.splits)
    # The same file as flowray wrote it before the field existed: no split_clamp key.
    config = json.loads((saved / "flow_config.json").read_text())
    del config["split_clamp"]
    (saved / "flow_config.json").write_text(json.dumps(config))
    assert all(split.clamp is None for split in load_flow(saved).splits)
