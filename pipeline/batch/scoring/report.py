"""What a scoring run reports: streaming statistics of the scored rows, the summary files beside
the outputs, and the MLflow summary run.

    <prefix>/_summary/<UTC time>/summary.json                 metrics (`drift_*` too), least
                                                              likely keys, skips, shards left out,
                                                              the drift verdict, the run's files
    <prefix>/_summary/<UTC time>/bits_per_dim_histogram.png
    <prefix>/_summary/<UTC time>/least_likely.png             the least likely images, captioned
    <prefix>/_summary/<UTC time>/ood_score_histogram.png      the run's ood_score over the
                                                              validation's (with a calibration)

A bits/dim that is not finite (+inf when the flow's density underflows, NaN when it breaks) stays
so in the Parquet files. Here such images are counted apart (`images_non_finite`) and ranked as
the least likely; mean, median, p99 and the histogram are over the finite values. summary.json is
strict JSON (`json_number`).
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import logging
import math
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from pipeline.batch.resolve import log_batch_run
from pipeline.batch.scoring.config import ScoreConfig, ScoreResult
from pipeline.data.tally import SkipTally
from pipeline.model.calibration import Calibration, DropTally, verdict
from pipeline.storage import join_url, redact_url, write_bytes_atomic

logger = logging.getLogger(__name__)

SUMMARY_DIR = "_summary"
LEFT_OUT_TAG = "flowray.left_out"  # MLflow tag of a summary run: "<shard>: <reason>" per line
_MAX_TAG = 5000  # MLflow's limit on a tag value (the full list is in summary.json)
# Histogram for the summary: fine bins give median and p99 to 1e-3 bits/dim in bounded memory.
_FINE_BIN, _FINE_MAX = 1e-3, 64.0


def json_number(value: float) -> float | str:
    """`value` as strict JSON can hold it: a finite float as itself, inf / -inf / NaN as the
    strings "Infinity" / "-Infinity" / "NaN", which Python's float() and JavaScript's Number()
    both read back."""
    value = float(value)
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def rank_keys(scores: np.ndarray) -> np.ndarray:
    """Higher ranks first (less likely): a finite score is itself; +inf, NaN and -inf map to inf,
    the largest float and the one below it, above every finite score in that order (the density
    computation broke down on that image, which is unusual either way; a finite score of 1.8e308
    would tie with them, none comes near)."""
    top = np.finfo(np.float64).max
    non_finite = np.where(
        scores == np.inf, np.inf, np.where(np.isnan(scores), top, np.nextafter(top, 0))
    )
    return np.where(np.isfinite(scores), scores, non_finite)


class ScoreStats:
    """Count, mean, fine histogram (for median / p99) and the least likely images, streaming;
    non-finite bits/dim apart (module docstring), as training's validation reports `finite_mean`.
    """

    def __init__(self, keep: int) -> None:
        self.count, self.non_finite, self.total = 0, 0, 0.0
        self.fine = np.zeros(int(_FINE_MAX / _FINE_BIN) + 1, dtype=np.int64)
        self.low, self.high = math.inf, -math.inf  # over the finite values
        self.keep = keep
        # min-heap on (rank, bits/dim, key, PNG): the least likely stay.
        self._heap: list[tuple[float, float, str, bytes]] = []

    @property
    def finite(self) -> int:
        return self.count - self.non_finite

    def add(self, rows: pd.DataFrame) -> None:
        """Take score rows: bits_per_dim, key, and png (b"" for images not kept by the actor)."""
        bits = rows["bits_per_dim"].to_numpy(dtype=np.float64)
        if not len(bits):
            return
        finite = np.isfinite(bits)
        values = bits[finite]
        self.count += len(bits)
        self.non_finite += int(len(bits) - len(values))
        if len(values):
            self.total += float(values.sum())
            self.low = min(self.low, float(values.min()))
            self.high = max(self.high, float(values.max()))
            # Clipped as floats: a cast first would turn values past int64 into INT64_MIN.
            fine = np.clip(values / _FINE_BIN, 0, len(self.fine) - 1).astype(np.int64)
            np.add.at(self.fine, fine, 1)
        columns = zip(rank_keys(bits), bits, rows["key"].to_numpy(), rows["png"].to_numpy())
        for rank, value, key, png in columns:
            if not png:
                continue
            item = (float(rank), float(value), str(key), bytes(png))
            if len(self._heap) < self.keep:
                heapq.heappush(self._heap, item)
            elif item[0] > self._heap[0][0]:
                heapq.heapreplace(self._heap, item)

    def least_likely(self) -> list[tuple[float, str, bytes]]:
        """(bits/dim, key, PNG) of the least likely images kept, least likely first."""
        ordered = sorted(self._heap, key=lambda item: (-item[0], item[2]))
        return [(value, key, png) for _, value, key, png in ordered]

    @property
    def mean(self) -> float:
        """Over the finite values (NaN without any)."""
        return self.total / self.finite if self.finite else math.nan

    def quantile(self, q: float) -> float:
        """Over the finite values (NaN without any); exact to _FINE_BIN / 2 up to _FINE_MAX."""
        if not self.finite:
            return math.nan
        rank = int(np.searchsorted(np.cumsum(self.fine), q * self.finite, side="left"))
        return (rank + 0.5) * _FINE_BIN  # centre of the bin

    def histogram(self, bins: int = 60) -> tuple[np.ndarray, np.ndarray]:
        """Counts over `bins` equal bins from the lowest to the highest finite value seen (values
        past _FINE_MAX fall in the last bin); empty arrays without finite values."""
        if not self.finite:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        low = min(max(math.floor(self.low / _FINE_BIN), 0), len(self.fine) - 1)
        high = min(math.ceil(self.high / _FINE_BIN) + 1, len(self.fine))
        chunks = np.array_split(self.fine[low:high], min(bins, high - low))
        counts = np.array([c.sum() for c in chunks])
        starts = np.cumsum([0] + [len(c) for c in chunks])
        return counts, (low + starts) * _FINE_BIN


def report(
    config: ScoreConfig,
    result: ScoreResult,
    stats: ScoreStats,
    tally: SkipTally,
    tracking_uri: str,
    shape: tuple[int, int, int],
    calibration: Calibration | None,
    drop: DropTally | None,
) -> ScoreResult:
    """Write the summary files under _summary/<time>/ and log the MLflow summary run; returns
    `result` with where they went and its drift verdict (against `calibration`, of `drop`)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    summary_url = join_url(result.output, SUMMARY_DIR, stamp)
    metrics = _metrics(result, stats)
    files = _pictures(result, stats, shape)
    if calibration is not None and drop is not None and drop.count:
        from pipeline.plots import score_histograms

        drift = verdict(calibration, drop, config.flag_quantile)
        metrics |= drift.metrics()
        result = dataclasses.replace(result, drift_level=drift.level, drift=drift.line())
        files["ood_score_histogram.png"] = score_histograms(
            {"validation": calibration.ood_score, "this run": drop.sample},
            f"ood_score under {result.model_name} v{result.model_version}: {drift.level}",
            "ood_score (pipeline.model.scores; higher = more unusual)",
            {f"flag threshold (q={1 - drift.expected_share:g})": drift.threshold},
        )
    elif not result.images_scored:
        result = dataclasses.replace(result, drift="drift: unknown (no images scored in this run)")
    if stats.non_finite:
        logger.warning(
            "%d of %d images have a non-finite bits/dim (kept as such in the files, ranked least "
            "likely); mean, median and p99 are over the other %d",
            stats.non_finite,
            stats.count,
            stats.finite,
        )
    summary = {
        "model": redact_url(config.model),
        "model_name": result.model_name,
        "model_version": result.model_version,
        "input": redact_url(config.input),
        "output": redact_url(result.output),
        "finished": stamp,
        "status": result.status,
        "metrics": {name: json_number(value) for name, value in metrics.items()},
        "least_likely": [
            {"key": key, "bits_per_dim": json_number(bits)} for bits, key, _ in stats.least_likely()
        ],
        "drift": {"level": result.drift_level, "line": result.drift},
        "files": list(result.files_written),
        "left_out": [{"shard": s, "reason": r} for s, r in result.shards_left_out],
        "skipped": [dataclasses.asdict(s) for s in tally.records()[:100]],
    }
    text = json.dumps(summary, indent=1, default=str, allow_nan=False)
    files["summary.json"] = text.encode()
    for name, data in files.items():
        write_bytes_atomic(join_url(summary_url, name), data, config.storage)
    run_id = None
    if config.log_to_mlflow:  # the config as params, the metrics, the summary files
        run_name = f"score {result.model_name} v{result.model_version} {stamp}"
        run_id = log_batch_run(
            config, tracking_uri, run_name, _tags(result), metrics, files, "summary"
        )
    return dataclasses.replace(result, summary_url=summary_url, mlflow_run_id=run_id)


def drift_unknown(name: str, version: str, registered: bool, problem: str = "") -> str:
    """The verdict line of a model version without a usable calibration (`problem`: what is
    wrong with the one it has, `Calibration.problem`)."""
    if not registered:
        return "drift: unknown (a model outside the registry has no calibration)"
    what = f"its calibration {problem}" if problem else "model version has no calibration"
    return (
        f"drift: unknown ({what}: run flowray models calibrate {name} {version} --data <its "
        "validation split>)"
    )


def _metrics(result: ScoreResult, stats: ScoreStats) -> dict[str, float]:
    """The run's figures; bits/dim statistics are over the finite values, `images_non_finite`
    counts the others."""
    return {
        "images_scored": result.images_scored,
        "images_non_finite": stats.non_finite,
        "images_skipped": result.images_skipped,
        "shards_written": len(result.shards_written),
        "shards_left_out": len(result.shards_left_out),
        "images_left_out": result.images_left_out,
        "shards_already_done": result.shards_already_done,
        "shards_new": result.shards_new,
        "shards_changed": result.shards_changed,
        "listing_seconds": result.listing_seconds,
        "mean_bits_per_dim": result.mean_bits_per_dim,
        "median_bits_per_dim": result.median_bits_per_dim,
        "p99_bits_per_dim": result.p99_bits_per_dim,
        "images_per_second": result.images_per_second,
        "seconds": result.seconds,
    }


def _pictures(
    result: ScoreResult, stats: ScoreStats, shape: tuple[int, int, int]
) -> dict[str, bytes]:
    """The bits/dim histogram and the grid of the least likely images, as PNG files by name."""
    from pipeline.data.images import decode_image
    from pipeline.plots import bits_per_dim_histogram, captioned_images_png

    label = f"{result.model_name} v{result.model_version}"
    files: dict[str, bytes] = {}
    if stats.finite:
        counts, edges = stats.histogram()
        apart = f" ({stats.non_finite:,} non-finite left out)" if stats.non_finite else ""
        files["bits_per_dim_histogram.png"] = bits_per_dim_histogram(
            counts,
            edges,
            f"bits/dim of {stats.finite:,} images under {label}{apart}",
            markers={"mean": stats.mean, "p99": stats.quantile(0.99)},
        )
    worst = stats.least_likely()
    if worst:
        images = np.stack([decode_image(png, shape) for _, _, png in worst])
        captions = [f"{key}\n{bits:.3f} bits/dim" for bits, key, _ in worst]  # inf: "inf"
        files["least_likely.png"] = captioned_images_png(
            images, captions, f"{len(worst)} least likely images under {label}"
        )
    return files


def _tags(result: ScoreResult) -> dict[str, str]:
    """The MLflow summary run's tags."""
    tags = {
        "flowray.job": "score",
        "flowray.status": result.status,
        "model_name": result.model_name,
        "model_version": result.model_version,
        "flowray.drift": result.drift_level,
    }
    if result.shards_left_out:
        listed = "\n".join(f"{shard}: {reason}" for shard, reason in result.shards_left_out)
        tags[LEFT_OUT_TAG] = listed if len(listed) <= _MAX_TAG else listed[: _MAX_TAG - 3] + "..."
    return tags
