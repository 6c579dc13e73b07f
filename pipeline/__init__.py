"""flowray's distributed and stateful parts: storage URLs, shards, Ray Data readers, training,
checkpoints, MLflow tracking, scoring and sampling.

Submodules are imported by name (`from pipeline.storage import StorageConfig`); this package
imports nothing itself, so `import pipeline` stays cheap and free of Ray.
"""

from __future__ import annotations

__all__: list[str] = []
