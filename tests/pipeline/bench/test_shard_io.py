"""The io suite: prepared shards written and read, foreign JPEG shards read in place next to the
same images prepared, and the listing of many shards, on local disk and S3 (moto); figures present,
finite and positive, and the tables show them. No timing thresholds: the machine is shared."""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.bench.harness import Run
from pipeline.bench.shard_io import Settings, measure


def test_io_suite_measures_prepared_and_foreign_shards_and_listing(
    tmp_path: Path, aws_credentials: None
) -> None:
    settings = Settings(
        images=40,
        repeats=1,
        shard_samples=20,
        with_ray=False,
        foreign_images=12,
        listing_shards=120,
    )
    report = measure(settings, Run(tmp_path, tmp_path)).report()
    foreign, listing = report["foreign"], report["listing"]
    assert report["images"] == 40 and foreign["images"] == 12 and listing["shards"] == 120
    for backend in ("local", "s3"):
        prepared = report["results"][backend]
        assert set(prepared) == {"write", "read_iter", "mb"}
        assert all(math.isfinite(v) and v > 0 for v in prepared.values()), prepared
        figures = foreign["results"][backend]
        assert set(figures) == {"reshard", "foreign_iter", "prepared_iter", "jpeg_mb", "png_mb"}
        assert all(math.isfinite(v) and v > 0 for v in figures.values()), figures
        assert listing["results"][backend]["shards"] == 120
        assert all(v > 0 for v in listing["results"][backend].values())
    assert "| S3 (moto, loopback) |" in report["markdown"]
    assert "JPEG in place (iter)" in report["markdown"]
    assert "resolve_input over 120 tiny shards" in report["markdown"]
