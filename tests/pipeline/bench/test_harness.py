"""pipeline.bench.harness: the memory sampler (psutil over this process and its descendants), the
machine, and the table type."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.bench.harness import RssSampler, Table, machine

pytestmark = pytest.mark.skipif(not psutil.LINUX, reason="PSS is Linux-only")

_CHILD = "import sys; block = bytearray(64 * 2**20); block[::4096] = b'x' * len(block[::4096]); "
_CHILD += "print('ready', flush=True); sys.stdin.read()"


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
