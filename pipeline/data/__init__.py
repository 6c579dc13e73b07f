"""Image data on storage: one reader for every WebDataset tar (prepared splits, whose manifest
entries it checks, and anyone else's shards, fitted in place), and what `prepare` reads and writes.

    tally.py       what readers report (ShardOutcome, SkipTally) and the error of bad data
                   (CorruptDataError, OnError, WHOLE_SHARD); imports nothing else of this package
    streams.py     storage faults retried and resumed (ResumingReader), never taken for bad data;
                   a file's version (version_of)
    images.py      pixels: limits checked before decoding, decode, fit to a shape, encode PNG
    shards.py      the prepared-split format (Manifest, ShardInfo, names, checks) and `prepare`
    inputs.py      what an input names, listed once: a prepared split or foreign shards
                   (pattern, prefix, list file); decides which, and gives each ShardRef its
                   manifest entry
    reader.py      iter_shard (one shard), iter_input / read_input (any input), fetch_images
    ray_source.py  a generic Ray Data datasource of read tasks; knows no format
    sources.py     what prepare reads: IDX, .npy, image folders, foreign WebDataset shards

Imports point one way: tally, streams, images -> shards -> inputs -> reader -> sources.

May import: flowmodel, pipeline.storage. Ray is imported lazily, inside the
functions that build Ray Data datasets or run Ray tasks.
"""

from __future__ import annotations

__all__: list[str] = []
