"""The training core's switches: bf16 precision and torch.compile with its eager fallback."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.train.core import StepLoss, run_step, start_training
from pipeline.train.step import flow_bits_per_dim
from tests.pipeline.train.tiny_run import smooth_images, tiny_config

CONFIG = tiny_config(
    "unread",
    model={"image_shape": [1, 8, 8], "levels": 1, "steps_per_level": 1, "hidden_channels": 4},
)


def images(count: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(smooth_images(count, seed)[:, None])


def started(config=CONFIG):
    from flowmodel import build_flow

    torch.manual_seed(0)
    flow = build_flow(config.model)
    flow.initialize(images(16), generator=torch.Generator().manual_seed(0))
    return start_training(flow, config, "cpu")


def test_bf16_steps_keep_weights_gradients_loss_and_average_in_float32() -> None:
    fp32, bf16 = started(), started(replace(CONFIG, precision="bf16"))
    assert (fp32.flow.precision, bf16.flow.precision) == ("fp32", "bf16")
    for step in range(3):
        a = run_step(fp32, CONFIG, images(seed=step), step)
        b = run_step(bf16, replace(CONFIG, precision="bf16"), images(seed=step), step)
        assert not a.skipped and not b.skipped
        # Same start, same noise: bf16 moves the loss in the 3rd decimal at most.
        assert abs(a.bits_per_dim - b.bits_per_dim) < 0.01, (step, a, b)
    assert {p.dtype for p in bf16.model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in bf16.model.parameters() if p.grad is not None} == {torch.float32}
    assert bf16.ema.model.precision == "fp32"  # evaluation and the shipped model: float32


def test_a_failing_compile_says_so_once_and_the_run_goes_on_eager() -> None:
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    training, lines = started(), []
    training.loss = StepLoss(compile=True, backend=broken_backend, say=lines.append)
    assert training.loss.note.startswith("training step: torch.compile")
    for step in range(2):
        metrics = run_step(training, CONFIG, images(seed=step), step)
        assert math.isfinite(metrics.bits_per_dim) and not metrics.skipped
    assert len(lines) == 1 and lines[0].startswith("training step: eager (torch.compile failed: ")
    assert "no C++ compiler on this machine" in lines[0]
    assert training.loss.compiled is None and training.loss.note == lines[0]


@pytest.mark.timeout(300)
def test_a_compiled_step_computes_what_the_eager_step_does() -> None:
    eager, compiled = started(), started()
    compiled.loss = StepLoss(compile=True, backend="aot_eager")  # traced forward and backward
    for step in range(2):
        a = run_step(eager, CONFIG, images(seed=step), step)
        b = run_step(compiled, CONFIG, images(seed=step), step)
        assert b.bits_per_dim == pytest.approx(a.bits_per_dim, abs=1e-5)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
    assert compiled.loss.proven and compiled.loss.compiled is not None
    for p, q in zip(eager.flow.parameters(), compiled.flow.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), atol=1e-5)


def test_compile_off_is_eager_and_says_so() -> None:
    loss = StepLoss(compile=False)
    assert loss.compiled is None and loss.eager is flow_bits_per_dim
    assert loss.note == "training step: eager (compile: false)"
