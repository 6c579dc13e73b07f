"""The GPU side of the batch jobs, checked on the CPU with the stand-in accelerator
(tests/pipeline/device_audit.py): a scoring actor and a sampling task on a device that is not the
CPU give the CPU's numbers, the PNG complexity can come from the read tasks, and GPU actors take
batches that fill a GPU."""

from __future__ import annotations

import numpy as np
import torch

from flowmodel import FlowConfig, build_flow
from pipeline.batch.sampling import _sample_chunk
from pipeline.batch.scoring.actors import Scorer, actor_batch_size
from pipeline.batch.scoring.config import ScoreConfig
from pipeline.model.artifact import FlowPayload
from pipeline.model.scores import add_png_complexity
from tests.pipeline.device_audit import AUDIT_DEVICE, AuditDevice


def payload() -> FlowPayload:
    torch.manual_seed(0)
    flow = build_flow(FlowConfig(image_shape=(1, 8, 8), levels=2, steps_per_level=1))
    flow.initialize(torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8))
    return FlowPayload.from_flow(flow)


def reader_batch(count: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "key": np.array([f"k{i}" for i in range(count)], dtype=object),
        "shard": np.array(["shard-0"] * count, dtype=object),
        "image": rng.integers(0, 256, (count, 1, 8, 8), dtype=np.uint8),
        "label": np.arange(count),
    }


def test_a_scoring_actor_on_the_device_gives_the_cpu_rows() -> None:
    batch = reader_batch()
    on_cpu = Scorer(payload(), seed=3, draws=2, keep_png=2)(batch)
    with AuditDevice():
        on_device = Scorer(payload(), seed=3, draws=2, device=str(AUDIT_DEVICE), keep_png=2)
        assert {p.device for p in on_device.flow.parameters()} == {AUDIT_DEVICE}
        rows = on_device(batch)
    for column in ("log_likelihood", "bits_per_dim", "png_bits_per_dim", "ood_score"):
        np.testing.assert_array_equal(rows[column], on_cpu[column], err_msg=column)
    assert list(rows["png"]) == list(on_cpu["png"]) and sum(len(p) > 0 for p in rows["png"]) == 2


def test_png_complexity_from_the_read_tasks_gives_the_same_rows() -> None:
    batch = reader_batch()
    scorer = Scorer(payload(), seed=0, draws=1, keep_png=3)
    in_actor = scorer(batch)
    from_read_tasks = scorer(add_png_complexity(batch))
    for column, values in in_actor.items():
        if values.dtype == object:
            assert list(from_read_tasks[column]) == list(values), column
        else:
            np.testing.assert_array_equal(from_read_tasks[column], values, err_msg=column)


def test_gpu_actors_take_batches_that_fill_a_gpu_and_cpu_actors_keep_theirs() -> None:
    cpu = ScoreConfig(model="m", input="i", output="o", batch_size=256)
    gpu = ScoreConfig(model="m", input="i", output="o", batch_size=256, gpus_per_actor=1)
    assert actor_batch_size(cpu, 3 * 32 * 32) == 256
    assert actor_batch_size(gpu, 3 * 32 * 32) == 2**24 // 3072 == 5461
    big = ScoreConfig(model="m", input="i", output="o", batch_size=20_000, gpus_per_actor=1)
    assert actor_batch_size(big, 3 * 32 * 32) == 20_000


def test_a_sampling_task_on_the_device_draws_the_cpu_images() -> None:
    on_cpu = _sample_chunk(payload(), seed=4, index=2, count=6, temperature=0.7, threads=1)
    with AuditDevice():
        on_device = _sample_chunk(payload(), 4, 2, 6, 0.7, 1, device=str(AUDIT_DEVICE))
    assert on_device == on_cpu and len(on_cpu) == 6
