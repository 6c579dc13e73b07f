"""Image data on storage: sources (IDX, image folders, .npy, foreign WebDataset shards), prepared
WebDataset shards with their manifest, and the readers (a streaming Ray Data datasource and a
plain iterator) of prepared splits and of foreign shards read in place.

    sources.py (+ source_base.py, folders.py,   what prepare reads; images.py: pixels and limits
      webdataset_source.py)
    shards.py (+ manifest.py)                   prepare's writer; the manifest and its checks
    reader.py (+ shard_reader.py, ray_source.py) the readers of prepared splits; tally.py: what
                                                readers report
    inputs.py                                   what a split argument names (prepared split,
                                                brace pattern, prefix, list file), listed once
    input_reader.py (+ foreign.py)              read_input/iter_input: either kind, one schema;
                                                foreign shards decoded and fitted in place
    streams.py                                  storage faults retried, never taken for bad data

May import: flowmodel, pipeline.errors, pipeline.storage. Ray is imported lazily, inside the
functions that build Ray Data datasets or run Ray tasks.
"""

from __future__ import annotations

__all__: list[str] = []
