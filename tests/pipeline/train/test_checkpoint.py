"""Checkpoints round trip: both flows' weights, the counters and the EMA's update count."""

from __future__ import annotations

from pathlib import Path

import torch

from flowmodel import FlowConfig, build_flow
from pipeline.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from pipeline.train.ema import EMA


def tiny_flow(seed: int):
    torch.manual_seed(seed)
    return build_flow(FlowConfig(image_shape=(1, 8, 8), levels=2, steps_per_level=1))


def test_checkpoint_round_trip_keeps_weights_counters_and_ema_updates(tmp_path: Path) -> None:
    flow = tiny_flow(0)
    ema = EMA(flow, decay=0.999)
    ema.update(tiny_flow(1))  # the average now differs from the flow
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    state = TrainState(
        step=7,
        images_seen=192,
        skipped_steps=1,
        optimizer=optimizer.state_dict(),
        rng=torch.get_rng_state(),
        history={"train": [[7, 5.5]], "validation": [[7, 5.9]]},
        ema_updates=ema.updates,
    )
    save_checkpoint(tmp_path, flow, ema.model, state, {"max_steps": 10})
    loaded_flow, loaded_ema, loaded = load_checkpoint(tmp_path)
    for original, copy in ((flow, loaded_flow), (ema.model, loaded_ema)):
        for key, value in original.state_dict().items():
            assert torch.equal(copy.state_dict()[key], value), key
    assert (loaded.step, loaded.images_seen, loaded.skipped_steps, loaded.ema_updates) == (
        7,
        192,
        1,
        1,
    )
    assert loaded.history == state.history
    assert torch.equal(loaded.rng, state.rng)


def test_checkpoint_without_ema_count_resumes_the_warm_up_at_its_step(tmp_path: Path) -> None:
    flow = tiny_flow(0)
    state = TrainState(7, 0, 0, {}, torch.get_rng_state(), {"train": [], "validation": []}, 3)
    save_checkpoint(tmp_path, flow, flow, state, {})
    raw = torch.load(tmp_path / "state.pt", weights_only=True)
    del raw["ema_updates"]  # as written before the count was stored
    torch.save(raw, tmp_path / "state.pt")
    assert load_checkpoint(tmp_path)[2].ema_updates == 7
