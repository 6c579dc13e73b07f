"""The io suite's foreign-shard half: JPEG shards read in place next to prepared PNG shards, and
the listing of many shards, on local disk and S3 (moto); figures present, finite and positive,
and the tables show them. No timing thresholds: the machine is shared."""

from __future__ import annotations

import math


def test_io_suite_measures_foreign_shards_and_listing(tmp_path, aws_credentials):
    from pipeline.bench.shard_io import run

    report = run(
        n_images=40,
        repeats=1,
        shard_samples=20,
        with_ray=False,
        workdir=str(tmp_path),
        foreign_images=12,
        listing_shards=120,
    )
    foreign, listing = report["foreign"], report["listing"]
    assert foreign["images"] == 12 and listing["shards"] == 120
    for backend in ("local", "s3"):
        figures = foreign["results"][backend]
        assert set(figures) == {
            "reshard",
            "foreign_iter",
            "prepared_iter",
            "jpeg_mb",
            "png_mb",
        }
        assert all(math.isfinite(v) and v > 0 for v in figures.values()), figures
        # Listing answered for every shard (listing_figures checks the count) in some time.
        assert all(v > 0 for v in listing["results"][backend].values())
    assert "| S3 (moto, loopback) |" in report["markdown"]
    assert "JPEG in place (iter)" in report["markdown"]
    assert "resolve_input over 120 tiny shards" in report["markdown"]
