"""Scoring's output: one Parquet file per shard, written once the shard is complete, so every key
lands exactly once across crashes, retries, reruns and concurrent jobs.

    <output>/model=<name>/version=<v>/_scoring.json          what the files mean (`check_settings`)
    <output>/model=<name>/version=<v>/<stem>@<v12>.parquet    the rows of one shard at one
                                                              version (`shard_file`)

Beside the scores, `flagged`: ood_score above the model version's flag threshold (its
calibration's quantile, pipeline.model.calibration; the file's `flowray.flag_threshold` metadata
says which), null when the version has no calibration.

`ShardCollector` groups the streamed score rows by shard (the first copy of each key wins: a task
may be retried). The reader marks a shard's last row, once it read the shard whole, with the rows
it handed on (`shard_rows`; `pipeline.data.reader`), so a shard is written as soon as those rows
are in. When the stream ends, a shard left is written only if its reader's `ShardOutcome` is
complete and exactly those rows arrived (its other images were bad, skipped; a shard with no image
gets an empty file, so it is not read again); otherwise it gets no file and is reported as left
out, with why. Rows for a shard already written are duplicates of a retried task: dropped.

Each file is created only if absent (`write_once`: a hard link locally, a conditional PUT on S3), so
a file present is final, and a rerun scores only the shards without one. Its Parquet metadata
records the images skipped in it and, for a foreign shard, which shard and version it scored. A
file of an older version of a shard (`ShardTarget.stale`) is deleted once the new one is in place.
A file of a shard the input no longer lists (renamed, or deleted by a retention policy) is kept,
and retired just before a file holding one of its keys is written: a renamed shard's keys then
appear once, under its new name (retired first, written second: a run killed in between leaves
the keys out, and the next run writes them; never twice), and the scores of a shard deleted from
the input stay. The cost: a run that writes files reads the keys of each orphan file once. The
driver holds only the small score rows of the shards being read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipeline.batch.scoring.config import ScoreError
from pipeline.data.inputs import ShardRef
from pipeline.data.tally import ShardOutcome
from pipeline.model.calibration import flags
from pipeline.storage import StorageConfig, join_url, read_bytes, write_once

logger = logging.getLogger(__name__)

# The Parquet columns and their Arrow types (pyarrow.type_for_alias names).
OUTPUT_TYPES = {
    "key": "string",
    "shard": "string",
    "label": "int64",
    "log_likelihood": "float64",
    "bits_per_dim": "float64",
    "png_bits_per_dim": "float64",
    "ood_score": "float64",
    "flagged": "bool",
    "orig_width": "int64",
    "orig_height": "int64",
}
OUTPUT_COLUMNS = tuple(OUTPUT_TYPES)
SETTINGS_FILE = "_scoring.json"
# Parquet file metadata (schema metadata) of every shard file: the bad images left out of it.
SKIPPED_COUNT_KEY = "flowray.skipped_count"
SKIPPED_KEYS_KEY = "flowray.skipped_keys"
# ...and of a foreign shard's file: which shard, at which version (see pipeline.batch.scoring.job).
SHARD_URL_KEY = "flowray.shard_url"
SHARD_VERSION_KEY = "flowray.shard_version"
SHARD_SIZE_KEY = "flowray.shard_size"
FLAG_THRESHOLD_KEY = "flowray.flag_threshold"  # the ood_score above which `flagged` is true
# Settings an earlier flowray did not record, as they were then: files made before the noise
# scheme was recorded used the first one.
LEGACY_SETTINGS = {"noise_scheme": "mt19937-v1"}
# A record in the settings, not a setting: {shard name: sha256} of the prepared split the prefix
# was first scored from (what its `<stem>.parquet` files hold; `shard_file`). A re-prepared split
# differs here and is scored again, never refused.
PREPARED_SHARDS_KEY = "prepared_shards"


def output_prefix(output: str, name: str, version: str) -> str:
    """`<output>/model=<name>/version=<version>`: where one model version's scores go."""
    return join_url(output, f"model={name}", f"version={version}")


def parquet_name(shard: str) -> str:
    """The output file of input shard `shard`: shard-000000.tar -> shard-000000.parquet."""
    return shard.rsplit(".", 1)[0] + ".parquet"


def shard_file(ref: ShardRef, first: Mapping[str, str] | None = None) -> str:
    """The output file of input shard `ref`, named so that a shard of other content gets another
    file: a foreign shard's `<stem>@<v12>.parquet`, v12 the first 12 hex digits of the sha256 of
    its listed version (`pipeline.data.streams.version_of`); a prepared shard's `<stem>.parquet`
    while its manifest sha256 is the one `first` (PREPARED_SHARDS_KEY; None: settings older than
    that key) records for its name, else `<stem>@<s12>.parquet`, s12 its sha256's first 12 hex
    digits, so a split re-prepared at the same path is scored again where its shards changed."""
    if ref.expect is not None:
        sha256 = ref.expect.sha256
        if first is None or first.get(ref.name) == sha256:
            return f"{ref.stem}.parquet"
        return f"{ref.stem}@{sha256[:12]}.parquet"
    digest = hashlib.sha256(ref.version.encode()).hexdigest()[:12]
    return f"{ref.stem}@{digest}.parquet"


def file_stem(name: str) -> str:
    """The shard stem an output file belongs to: "a%2Fb@0123abcd4567.parquet" -> "a%2Fb"."""
    return name.removesuffix(".parquet").rsplit("@", 1)[0]


def is_scores_file(name: str) -> bool:
    """A shard's file, by its name under the prefix (not `_scoring.json`, a temp or a folder)."""
    return name.endswith(".parquet") and name[0] not in "._"


def orphan_files(names: Sequence[str], stems: set[str]) -> tuple[str, ...]:
    """The shard files among `names` (a prefix's listing) of shards whose stem is not in
    `stems` (the input's): shards renamed, or no longer listed."""
    return tuple(n for n in sorted(names) if is_scores_file(n) and file_stem(n) not in stems)


def _shown(value: Any) -> str:
    return "not recorded" if value is None else repr(value)


def check_settings(prefix: str, settings: dict[str, Any], storage: StorageConfig) -> None:
    """Record what the files under `prefix` mean (`_scoring.json`: the input, seed, draws, noise
    scheme and weights' sha256, everything that decides the numbers), or refuse a run whose
    settings differ, naming both (so two jobs with other seeds, or a re-created model reusing a
    version number, never mix files under one prefix).

    The file is created only if absent, so of two jobs started together one records its settings
    and the other compares with them (no check-then-write window).
    """
    url = join_url(prefix, SETTINGS_FILE)
    if write_once(url, json.dumps(settings, indent=1, sort_keys=True).encode(), storage):
        return
    found = json.loads(read_bytes(url, storage))
    for key, value in LEGACY_SETTINGS.items():
        if key in settings:
            found.setdefault(key, value)
    keys = (set(settings) | set(found)) - {PREPARED_SHARDS_KEY}
    differ = sorted(k for k in keys if found.get(k) != settings.get(k))
    if not differ:
        return
    hint = "write to another --output, or rerun with the settings used before"
    if all(k not in found for k in differ):
        # Recorded by an earlier flowray, before these settings were kept.
        hint = (
            f"{SETTINGS_FILE} predates these settings: if its files were scored with this very "
            f"model, add {', '.join(f'{k!r}: {settings[k]!r}' for k in differ)} to it; else "
            "write to another --output"
        )
    raise ScoreError(
        f"{prefix} holds scores made with other settings ({', '.join(differ)}: "
        f"{', '.join(_shown(found.get(k)) for k in differ)}; this run: "
        f"{', '.join(_shown(settings.get(k)) for k in differ)})",
        hint=hint,
    )


def _parquet(
    frame: pd.DataFrame, target: ShardTarget, skipped_keys: Sequence[str], threshold: float | None
) -> bytes:
    """The shard's rows as Parquet bytes with fixed column types, sorted by key, the flags at
    `threshold` (null without one) and the skip metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [(name, pa.type_for_alias(kind)) for name, kind in OUTPUT_TYPES.items()],
        metadata={
            **target.metadata,
            SKIPPED_COUNT_KEY: str(len(skipped_keys)),
            SKIPPED_KEYS_KEY: json.dumps(sorted(skipped_keys)),
            FLAG_THRESHOLD_KEY: "" if threshold is None else repr(threshold),
        },
    )
    frame = frame.sort_values("key", kind="stable").reset_index(drop=True)
    flagged = (
        pd.array(flags(frame["ood_score"].to_numpy(), threshold))
        if threshold is not None
        else pd.array([None] * len(frame), dtype="boolean")
    )
    frame = frame.assign(shard=target.label, flagged=flagged)
    for name in ("orig_width", "orig_height"):  # rows of readers that do not know them
        if name not in frame:
            frame[name] = -1
    table = pa.Table.from_pandas(frame[list(OUTPUT_COLUMNS)], schema=schema, preserve_index=False)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def remove_files(prefix: str, names: Sequence[str], storage: StorageConfig) -> None:
    """Delete the files of older versions of a shard whose current file is in place (a reader
    never sees the shard without a file; a crash in between leaves both, and the next run,
    finding the current one, deletes the stale one then)."""
    from pipeline.storage import fsspec_filesystem

    for name in names:
        url = join_url(prefix, name)
        fs, path = fsspec_filesystem(url, storage)
        with contextlib.suppress(FileNotFoundError):  # a concurrent run removed it first
            fs.rm_file(path)


def _left_out_reason(outcome: ShardOutcome | None, received: int) -> str:
    """Why a shard must get no file, or "" when it is complete as received."""
    if outcome is None:
        return f"its reader reported no outcome ({received} rows arrived)"
    if not outcome.complete:
        if outcome.transient:
            return f"{outcome.reason} (storage kept failing: a rerun retries it)"
        return outcome.reason
    if received != outcome.rows:
        return f"{received} rows arrived, its reader handed on {outcome.rows}"
    return ""


@dataclass(frozen=True)
class ShardTarget:
    """Where one input shard's rows go and what its file says about it."""

    file: str  # the Parquet file's name under the prefix
    label: str  # the `shard` column's value (the shard's URL; a prepared split's shard name)
    expected: int | None = None  # images the manifest lists; None when unknown (foreign)
    metadata: Mapping[str, str] = field(default_factory=dict)  # a foreign shard's URL, version
    stale: tuple[str, ...] = ()  # files of older versions of this shard, deleted once in place


@dataclass
class _Partial:
    """Rows received for one shard so far."""

    frames: list[pd.DataFrame] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)
    total: int | None = None  # rows the shard handed on, once its end marker has arrived


class ShardCollector:
    """Groups streamed score rows by shard and writes each shard's file once (module docstring).

    Args:
        prefix: the model version's output folder (see output_prefix).
        targets: per pending shard (the rows' `shard` value): a ShardTarget, or the manifest's
            image count (file `parquet_name(shard)`, labelled `shard`).
        on_written: called with a shard's label after its file is in place.
        on_rows: called with a shard's rows (`png` included) when its file is written, so
            statistics cover exactly the rows written.
        outcome_of: the reader's outcome of a shard (`SkipTally.outcome`), asked for the bad
            images its file records when its end marker says it is complete.
        orphans: files of shards the input no longer lists (`orphan_files`), retired as the
            module docstring says.
        threshold: the flag threshold of the `flagged` column (None: null flags).

    A shard without end markers is complete at its manifest count. After `close`: `written`
    (labels of shards whose file is in place, in order), `left_out` ({label: reason}),
    `late_rows` (duplicate rows dropped) and `retired` (orphan files deleted).
    """

    def __init__(
        self,
        prefix: str,
        targets: Mapping[str, ShardTarget | int],
        storage: StorageConfig,
        on_written: Callable[[str], None] | None = None,
        on_rows: Callable[[pd.DataFrame], None] | None = None,
        outcome_of: Callable[[str], ShardOutcome | None] | None = None,
        orphans: Sequence[str] = (),
        threshold: float | None = None,
    ) -> None:
        self.prefix, self.storage, self.threshold = prefix, storage, threshold
        self.targets = {
            shard: t if isinstance(t, ShardTarget) else ShardTarget(parquet_name(shard), shard, t)
            for shard, t in targets.items()
        }
        self.on_written, self.on_rows, self.outcome_of = on_written, on_rows, outcome_of
        self.written: list[str] = []
        self.left_out: dict[str, str] = {}
        self.late_rows = 0
        self.retired: list[str] = []
        self._orphans = tuple(orphans)
        self._orphan_keys: dict[str, set[str]] | None = None
        self._partial: dict[str, _Partial] = {}
        self._finished: set[str] = set()

    def add(self, batch: pd.DataFrame) -> None:
        """Take a batch of score rows. A shard whose rows are all in is written before this
        returns."""
        for name, rows in batch.groupby("shard", sort=False):
            shard = str(name)
            if shard in self._finished:
                # A retried read task sends a written shard's rows again: duplicates, dropped.
                self.late_rows += len(rows)
                continue
            state = self._partial.setdefault(shard, _Partial())
            if "shard_rows" in rows:
                marked = rows["shard_rows"].to_numpy()
                if (marked >= 0).any():
                    state.total = int(marked.max())
                rows = rows.drop(columns="shard_rows")
            # A retried read task may send rows again: keep the first copy of each key.
            fresh = rows[~rows["key"].isin(state.keys)].drop_duplicates("key")
            if not fresh.empty:
                state.keys.update(fresh["key"])
                state.frames.append(fresh)
            if len(state.keys) == state.total:
                self._finish(shard, self._skipped_keys(shard))
            elif state.total is None and len(state.keys) == self.targets[shard].expected:
                self._finish(shard, ())  # every image the manifest lists: none was skipped

    def _skipped_keys(self, shard: str) -> Sequence[str]:
        expected = self.targets[shard].expected
        if expected is not None and len(self._partial[shard].keys) == expected:
            return ()
        outcome = self.outcome_of(shard) if self.outcome_of is not None else None
        return outcome.skipped_keys if outcome is not None else ()

    def close(self, outcomes: Mapping[str, ShardOutcome] | None) -> None:
        """The stream has ended: settle every shard not written yet by the readers' `outcomes`
        (`SkipTally.outcomes()`; module docstring). None (no tally: on_error="fail", where any
        problem stops the job): the shards left are written with what they got."""
        if self.late_rows:
            logger.info("dropped %d late duplicate rows of shards already written", self.late_rows)
        if outcomes is None:
            self._close_without_outcomes()
            return
        for shard in sorted(set(self.targets) - self._finished):
            state = self._partial.setdefault(shard, _Partial())
            outcome = outcomes.get(shard)
            reason = _left_out_reason(outcome, len(state.keys))
            if reason:
                del self._partial[shard]
                self.left_out[self.targets[shard].label] = reason
            else:
                self._finish(shard, outcome.skipped_keys if outcome else ())
        for label, reason in sorted(self.left_out.items()):
            logger.warning("left out shard %s (no file written): %s", label, reason)

    def _close_without_outcomes(self) -> None:
        for shard in sorted(self._partial):
            got, expected = len(self._partial[shard].keys), self.targets[shard].expected
            if expected is not None and got != expected:
                logger.warning("shard %s: %d images scored, manifest says %d", shard, got, expected)
            self._finish(shard, ())
        missing = sorted(set(self.targets) - self._finished)
        if missing:
            logger.warning(
                "no image of %d shard(s) could be read (%s): no file written, a rerun retries them",
                len(missing),
                ", ".join(self.targets[s].label for s in missing[:5]),
            )

    def _finish(self, shard: str, skipped_keys: Sequence[str]) -> None:
        rows, target = self._partial.pop(shard), self.targets[shard]
        frame = (
            pd.concat(rows.frames, ignore_index=True)
            if rows.frames
            else pd.DataFrame({name: [] for name in (*OUTPUT_COLUMNS, "png")})
        )
        self._retire_orphans(set(frame["key"]))
        data = _parquet(frame, target, skipped_keys, self.threshold)
        if not write_once(join_url(self.prefix, target.file), data, self.storage):
            logger.info("shard %s: its file was already written (another job): kept", target.label)
        if target.stale:
            remove_files(self.prefix, target.stale, self.storage)
        self._finished.add(shard)
        self.written.append(target.label)
        if self.on_rows is not None:
            self.on_rows(frame)
        if self.on_written is not None:
            self.on_written(target.label)

    def _retire_orphans(self, keys: set[str]) -> None:
        """Delete the orphan files holding one of `keys` (about to be written elsewhere)."""
        if not self._orphans or not keys:
            return
        if self._orphan_keys is None:
            self._orphan_keys = {
                name: _keys_of(join_url(self.prefix, name), self.storage) for name in self._orphans
            }
        doomed = sorted(name for name, held in self._orphan_keys.items() if held & keys)
        if not doomed:
            return
        logger.info(
            "retiring %d file(s) of shards no longer listed whose keys are scored again under "
            "another shard: %s",
            len(doomed),
            ", ".join(doomed[:5]),
        )
        remove_files(self.prefix, doomed, self.storage)
        for name in doomed:
            del self._orphan_keys[name]
        self.retired.extend(doomed)


def _keys_of(url: str, storage: StorageConfig) -> set[str]:
    """The `key` column of one shard file (empty when it is gone: a concurrent run retired it)."""
    import io

    import pyarrow.parquet as pq

    try:
        data = read_bytes(url, storage)
    except FileNotFoundError:
        return set()
    return set(pq.read_table(io.BytesIO(data), columns=["key"]).column("key").to_pylist())
