"""pipeline.bench.harness: the memory sampler (psutil over this process and its descendants), the
machine, the table type, and the in-process training race's schedule, skips and EMA."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from pipeline.bench.harness import Racer, RssSampler, Table, machine
from pipeline.train.config import TrainConfig
from pipeline.train.step import StepMetrics

linux_only = pytest.mark.skipif(not psutil.LINUX, reason="PSS is Linux-only")

_CHILD = "import sys; block = bytearray(64 * 2**20); block[::4096] = b'x' * len(block[::4096]); "
_CHILD += "print('ready', flush=True); sys.stdin.read()"


@linux_only
def test_the_sampler_counts_a_child_process_and_its_memory() -> None:
    alone = RssSampler()
    alone.sample()
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        with RssSampler(interval=0.05) as sampler:
            time.sleep(0.2)  # a few samples while the child holds its 64 MiB
    finally:
        child.communicate("")
    assert sampler.processes == alone.processes + 1
    # The child touched 64 MiB of its own: both sums grow by at least that much.
    assert sampler.peak_rss_mb - alone.peak_rss_mb >= 60
    assert sampler.peak_pss_mb - alone.peak_pss_mb >= 60
    assert 0 < sampler.peak_pss_mb <= sampler.peak_rss_mb
    # The peak's breakdown names the holder: the child (by its executable) and this "driver".
    by_role = sampler.peak_pss_by_role_mb
    assert by_role[Path(sys.executable).name] >= 60 and by_role["driver"] > 0
    assert sum(by_role.values()) == pytest.approx(sampler.peak_pss_mb)


@linux_only
def test_a_gone_root_samples_nothing() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    sampler = RssSampler(root=gone.pid)
    sampler.sample()
    assert sampler.processes == 0 and sampler.peak_rss_mb == 0 and sampler.peak_pss_mb == 0


def test_the_machine_names_its_cpu() -> None:
    info = machine()
    assert info["cpu"] not in ("", "unknown") and info["cores"] >= 1


def test_a_table_renders_its_cells_and_notes_as_markdown_and_json() -> None:
    table = Table(["what", "count", "rate"], [["a", 12345, 0.5], ["b", 7, float("nan")]], ["note"])
    assert table.markdown().splitlines() == [
        "| what | count | rate |",
        "|---|---|---|",
        "| a | 12,345 | 0.500 |",
        "| b | 7 | n/a |",
        "",
        "note",
    ]
    assert table.to_dict()["rows"][0] == ["a", 12345, 0.5]
    assert Table([], notes=["skipped: no GPU"]).markdown() == "skipped: no GPU"


def test_a_racer_warms_up_counts_skips_and_averages_only_good_steps() -> None:
    optim = {"lr": 1.0, "warmup_steps": 4, "ema_decay": 0.5}
    config = TrainConfig.from_dict({"optim": optim, "batch_size": 2, "scaling": {"num_workers": 1}})
    rates: list[float] = []

    def every_second_step_skipped(model, batch, optimizer, **_) -> StepMetrics:
        rates.append(optimizer.param_groups[0]["lr"])
        return StepMetrics(float(len(rates)), 1.0, skipped=len(rates) % 2 == 0)

    images = torch.zeros(8, 1, 1, 1, dtype=torch.uint8)
    model = torch.nn.Linear(1, 1, bias=False)
    step = every_second_step_skipped
    racer = Racer(model, images, config, seconds=1e9, max_steps=4, step=step)
    while not racer.done:
        racer.advance()
    assert rates == [0.25, 0.5, 0.75, 1.0]
    assert (racer.skipped, racer.ema.updates) == (2, 2)
    assert (racer.steps, racer.loss) == (4, 4.0)


def test_a_racers_progress_is_step_time_or_steps_whichever_binds_first() -> None:
    def skipped(*args: object, **kwargs: object) -> StepMetrics:
        return StepMetrics(0.0, 0.0, skipped=True)

    images = torch.zeros(8, 1, 2, 2, dtype=torch.uint8)
    config = TrainConfig.from_dict({"batch_size": 2, "scaling": {"num_workers": 1}})
    budget = {"seconds": 3600.0, "max_steps": 10}
    racer = Racer(torch.nn.Linear(1, 1), images, config, step=skipped, **budget)
    for _ in range(4):
        racer.advance()
    assert racer.progress == pytest.approx(0.4)  # the step budget binds: 4 of 10
