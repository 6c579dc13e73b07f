"""Image data on storage: sources (IDX, image folders, .npy), prepared WebDataset shards with
their manifest, and the readers (a streaming Ray Data datasource and a plain iterator).

    sources.py (+ source_base.py, folders.py)   what prepare reads; images.py: pixels and limits
    shards.py (+ manifest.py)                   prepare's writer; the manifest and its checks
    reader.py (+ shard_reader.py, ray_source.py) the readers; tally.py: what they report
    streams.py                                  storage faults retried, never taken for bad data

May import: flowmodel, pipeline.errors, pipeline.storage. Ray is imported lazily, inside the
functions that build Ray Data datasets or run Ray tasks.
"""

from __future__ import annotations

__all__: list[str] = []
