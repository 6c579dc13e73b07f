"""Image data on storage: sources (IDX, image folders, .npy), prepared WebDataset shards with
their manifest, and the readers (a streaming Ray Data datasource and a plain iterator).

May import: flowmodel, pipeline.errors, pipeline.storage. Ray is imported lazily, inside the
functions that build Ray Data datasets or run Ray tasks.
"""

from __future__ import annotations

__all__: list[str] = []
