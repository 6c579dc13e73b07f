"""The step_phases suite: the phases of a step lie within it, and plain DDP trains on 2 processes."""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.bench.harness import Run
from pipeline.bench.step_phases import PHASES, SMOKE, Settings, ddp_rate, measure
from pipeline.config import load_config
from pipeline.train.config import TrainConfig

SMALL = SMOKE["config_overrides"]


def test_the_phases_lie_within_the_step(tmp_path: Path) -> None:
    settings = Settings(config_overrides=tuple(SMALL), batch=8, steps=10, ddp_seconds=0)
    report = measure(settings, Run(tmp_path, tmp_path)).report()
    ms = report["phases_ms"]
    # Each step's phases are consecutive intervals of that step, so each phase's median is at most
    # the whole step's median (the medians of the parts need not add up to the median whole).
    assert all(0 < ms[name] <= ms["total"] for name in PHASES)
    assert "ddp" not in report and "| step |" in report["markdown"]


def test_plain_ddp_runs_the_production_step_on_two_processes() -> None:
    config = load_config(TrainConfig, "fashion-mnist", SMALL)
    figures = ddp_rate(config, workers=2, batch=8, seconds=0.5, sync=True)
    assert figures["steps"] >= 2 and figures["ms_per_step"] > 0
    assert math.isclose(figures["images_per_second"], 16 / (figures["ms_per_step"] / 1000))
