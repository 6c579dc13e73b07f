"""The least likely (or most out-of-distribution) images of a scoring output, in bounded memory.

    result = top_scores("s3://scores/photos", "photo-flow/3", storage, n=100, by="bits_per_dim")
    for row in result.rows: print(row.rank, row.score, row.key, row.shard_url)
    png = draw_top(result, storage, shape=(3, 64, 64))      # the images, fetched from the shards

Reads `<output>/model=<name>/version=<v>/*.parquet` (pipeline.batch.scoring.output) with pyarrow,
file by file and batch by batch (`batch_rows` rows of the few columns needed), keeping a running
top n: memory is O(n + batch_rows), whatever the dataset's size. Higher is worse for both
scores: bits_per_dim (least likely) and ood_score (pipeline.model.scores: most out-of-distribution).
A non-finite score ranks above every finite one (`pipeline.batch.scoring.report.rank_keys`);
`non_finite_scores` counts them. Ties are broken by shard, then key, so the answer does not
depend on file order.

`output_drift` gives the drift verdict (pipeline.model.calibration) of a version's scores, or of
the files one scoring run wrote (`run_files`: its summary.json lists them; on a growing prefix,
the shards new that night).

Without a version, the newest version folder under `model=<name>` is read (numeric versions by
number, others by name). Each row's `shard` is a URL when scoring wrote one (foreign inputs);
a bare shard name (a prepared split's shard) is joined to the input: `input_url`, else the
`input` of the newest `_summary/*/summary.json` of that version.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline.batch.scoring.config import ScoreError
from pipeline.batch.scoring.output import is_scores_file, output_prefix
from pipeline.batch.scoring.report import SUMMARY_DIR, rank_keys
from pipeline.model.calibration import Calibration, Drift, DropTally, verdict
from pipeline.storage import (
    StorageConfig,
    arrow_filesystem,
    join_url,
    list_files,
    list_tree,
    read_bytes,
)

logger = logging.getLogger(__name__)

By = Literal["bits_per_dim", "ood_score"]
BY: tuple[str, ...] = ("bits_per_dim", "ood_score")
_COLUMNS = ("key", "shard", "bits_per_dim", "ood_score", "label")  # what a top row shows


@dataclass(frozen=True)
class TopRow:
    rank: int
    score: float  # the ranking column's value
    key: str
    shard: str  # as the output file has it
    shard_url: str  # where the image is ("" when it cannot be told)
    bits_per_dim: float
    ood_score: float
    label: int


@dataclass(frozen=True)
class TopResult:
    prefix: str  # <output>/model=<name>/version=<v>
    model_name: str
    version: str
    by: str
    rows: tuple[TopRow, ...]
    files_read: int
    rows_read: int
    non_finite_scores: int  # rows whose ranking score is +inf, -inf or NaN (ranked first)
    seconds: float

    def table(self) -> str:
        """The rows as the command prints them."""
        lines = [f"{'rank':>5}  {self.by:>12}  {'bits/dim':>9}  {'ood':>8}  key  shard"]
        for r in self.rows:
            lines.append(
                f"{r.rank:>5}  {r.score:>12.4f}  {r.bits_per_dim:>9.4f}  {r.ood_score:>8.4f}  "
                f"{r.key}  {r.shard_url or r.shard}"
            )
        return "\n".join(lines)


def _version_order(version: str) -> tuple[int, int, str]:
    """Registry versions by number (newest last), after any named ones ("local", "run-...")."""
    return (1, int(version), "") if version.isdigit() else (0, 0, version)


def model_prefix(output: str, model: str, storage: StorageConfig | None) -> tuple[str, str, str]:
    """(prefix, name, version) of `model` ("name" or "name/version") under `output`."""
    name, _, version = model.partition("/")
    if not name:
        raise ScoreError(f"--model: expected <name>[/<version>], found {model!r}")
    # The listing names local files by absolute path: a relative --output must be one too.
    root = output if "://" in output else os.path.abspath(output)
    base = join_url(root, f"model={name}")
    if not version:
        prefix_text = base.rstrip("/") + "/version="
        found = {
            url[len(prefix_text) :].split("/", 1)[0]
            for url in list_tree(base, storage, recursive=True)
            if url.startswith(prefix_text) and url.endswith(".parquet")
        }
        if not found:
            raise ScoreError(
                f"no scores of model {name} under {output} (expected {base}/version=<v>/*.parquet)",
                hint="check --output and --model; `flowray score` writes there",
            )
        version = max(found, key=_version_order)
        if len(found) > 1:
            logger.warning(
                "model %s: reading version %s (newest of %s)",
                name,
                version,
                sorted(found, key=_version_order),
            )
    return output_prefix(root, name, version), name, version


class _Running:
    """The n highest scores seen so far, ties broken by (shard, key); O(n) memory."""

    def __init__(self, n: int) -> None:
        self.n = n
        # (rank key, score, shard, key, bits/dim, ood score, label)
        self.best: list[tuple[float, float, str, str, float, float, int]] = []
        self.rows = self.non_finite = 0

    def add(self, score: np.ndarray, batch: dict[str, np.ndarray]) -> None:
        """Take one batch of `_columns`, ranked by `score` (one of its columns)."""
        self.rows += len(score)
        self.non_finite += int((~np.isfinite(score)).sum())
        ranks = rank_keys(score)
        index = np.arange(len(score))
        if len(index) > self.n:
            # Everything at or above the batch's n-th highest rank (ties included).
            threshold = np.partition(ranks, len(index) - self.n)[len(index) - self.n]
            index = index[ranks >= threshold]
        if len(self.best) == self.n and len(index):
            index = index[ranks[index] >= self.best[-1][0]]
        key, shard, bits, ood, label = (batch[name] for name in _COLUMNS)
        for i in index:
            entry = (float(ranks[i]), float(score[i]), str(shard[i]), str(key[i]))
            self.best.append((*entry, float(bits[i]), float(ood[i]), int(label[i])))
        self.best.sort(key=lambda e: (-e[0], e[2], e[3]))
        del self.best[self.n :]


def _columns(
    url: str, storage: StorageConfig | None, wanted: Sequence[str], batch_rows: int
) -> Iterator[dict[str, np.ndarray]]:
    """The `wanted` columns of one scores file, batch by batch, as numpy arrays by name."""
    import pyarrow.parquet as pq

    fs, path = arrow_filesystem(url, storage)
    with fs.open_input_file(path) as file:
        parquet = pq.ParquetFile(file)
        missing = [c for c in wanted if c not in parquet.schema_arrow.names]
        if missing:
            raise ScoreError(f"{url}: not a scores file (no column {', '.join(missing)})")
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=wanted):
            yield {name: batch.column(name).to_numpy(zero_copy_only=False) for name in wanted}


def _summaries(prefix: str, storage: StorageConfig | None) -> list[str]:
    """The summary.json URLs of a version's scoring runs, oldest first (named by UTC time)."""
    return sorted(
        url
        for url in list_tree(join_url(prefix, SUMMARY_DIR), storage, recursive=True)
        if url.endswith("/summary.json")
    )


def _shard_url(shard: str, input_url: str | None) -> str:
    if "://" in shard or shard.startswith("/"):
        return shard
    return join_url(input_url, shard) if input_url else ""


def top_scores(
    output: str,
    model: str,
    storage: StorageConfig | None = None,
    *,
    n: int = 100,
    by: By = "bits_per_dim",
    input_url: str | None = None,
    batch_rows: int = 65_536,
) -> TopResult:
    """The `n` highest-`by` rows of a model version's scores (see the module docstring).

    Raises:
        ScoreError: no scores of that model under `output`, an unknown `by`, a file that is
            not a scores file.
    """
    if by not in BY:
        raise ScoreError(f"--by: expected one of {', '.join(BY)}, found {by!r}")
    if n < 1:
        raise ScoreError(f"--n: expected at least 1, found {n}")
    started = time.perf_counter()
    prefix, name, version = model_prefix(output, model, storage)
    files = _scores_files(prefix, storage)
    running = _Running(n)
    for file in files:
        for batch in _columns(join_url(prefix, file), storage, _COLUMNS, batch_rows):
            running.add(batch[by].astype(np.float64), batch)
    if input_url is None and any(_shard_url(e[2], None) == "" for e in running.best):
        summaries = _summaries(prefix, storage)  # the input the newest one recorded
        if summaries:
            input_url = json.loads(read_bytes(summaries[-1], storage)).get("input")
    rows = tuple(
        TopRow(rank, score, key, shard, _shard_url(shard, input_url), bits, ood, label)
        for rank, (_, score, shard, key, bits, ood, label) in enumerate(running.best, start=1)
    )
    seconds = time.perf_counter() - started
    return TopResult(
        prefix, name, version, by, rows, len(files), running.rows, running.non_finite, seconds
    )


def _scores_files(prefix: str, storage: StorageConfig | None) -> list[str]:
    files = sorted(filter(is_scores_file, list_files(prefix, storage)))
    if not files:
        raise ScoreError(f"no scores files (*.parquet) in {prefix}")
    return files


def run_files(prefix: str, storage: StorageConfig | None, run: str) -> tuple[str, list[str]]:
    """(run, its Parquet files): the files scoring run `run` wrote (the name of its
    `_summary/<UTC time>` folder, or "latest"), as its summary.json lists them."""
    summaries = _summaries(prefix, storage)
    runs = {url.rsplit("/", 2)[-2]: url for url in summaries}
    if run == "latest" and summaries:
        run = summaries[-1].rsplit("/", 2)[-2]
    if run not in runs:
        raise ScoreError(
            f"--run: expected a scoring run of {prefix} (latest, "
            f"{', '.join(sorted(runs)[-5:]) or 'none yet'}), found {run!r}"
        )
    files = json.loads(read_bytes(runs[run], storage)).get("files")
    if files is None:
        raise ScoreError(
            f"{runs[run]} lists no files (written before runs recorded them)",
            hint="leave out --run: the verdict then covers every file of the version",
        )
    return run, files


def output_drift(
    prefix: str,
    storage: StorageConfig | None,
    calibration: Calibration,
    files: list[str] | None = None,
    quantile: float | None = None,
    batch_rows: int = 65_536,
) -> Drift:
    """The drift verdict (pipeline.model.calibration) of the scores in `files` under `prefix`
    (default: every file), flagged at `quantile` (default the calibration's), read in bounded
    memory."""
    drop = DropTally(calibration.threshold(quantile), calibration.bits_mean)
    for name in _scores_files(prefix, storage) if files is None else files:
        for batch in _columns(join_url(prefix, name), storage, BY, batch_rows):
            drop.add(batch["bits_per_dim"], batch["ood_score"])
    if not drop.count:
        raise ScoreError(f"no scored images in {len(files or [])} file(s) of {prefix}")
    return verdict(calibration, drop, quantile)


def draw_top(
    result: TopResult,
    storage: StorageConfig | None = None,
    shape: tuple[int, int, int] = (3, 64, 64),
    columns: int = 10,
) -> bytes:
    """The rows' images in a captioned grid (PNG bytes), fetched from their shards and fitted to
    `shape` with prepare's rules; an image that cannot be fetched is a grey tile."""
    from pipeline.data.reader import fetch_images
    from pipeline.plots import captioned_images_png

    unknown = [r.key for r in result.rows if not r.shard_url]
    if unknown:
        raise ScoreError(
            f"cannot tell where {len(unknown)} image(s) are ({unknown[0]}, ...): their shard is "
            "a bare name and no input was recorded",
            hint="pass --input <the prepared split that was scored>",
        )
    by_shard: dict[str, list[str]] = {}
    for row in result.rows:
        by_shard.setdefault(row.shard_url, []).append(row.key)
    found = {
        (url, key): image.pixels
        for url, keys in by_shard.items()
        for key, image in fetch_images(url, keys, shape, storage).items()
    }
    blank = np.full(shape, 128, dtype=np.uint8)
    images = np.stack([found.get((r.shard_url, r.key), blank) for r in result.rows])
    captions = [f"#{r.rank} {r.key}\n{r.score:.3f}" for r in result.rows]
    title = f"{len(result.rows)} highest {result.by} under {result.model_name} v{result.version}"
    return captioned_images_png(images, captions, title, columns=min(columns, len(images)))
