"""Benchmark suites behind `flowray bench`: model quality, training and scoring throughput,
scaling, shard I/O. Out of the production path: nothing outside bench/ and jobs/bench.py imports it.

May import everything in pipeline and flowmodel.
"""

from __future__ import annotations

__all__: list[str] = []
