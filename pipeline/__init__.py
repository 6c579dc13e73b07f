"""flowray's distributed and stateful parts, in subpackages that follow the data:

    data/      images on storage: sources, prepared shards + manifest, readers (Ray Data, iterator)
    train/     TrainConfig, the pure step, the Ray Train worker loop, the driver, checkpoints
    model/     the model artifact, per-image likelihood, the MLflow pyfunc (what a model ships)
    tracking/  the MLflow connection and the registry
    batch/     scoring and sampling jobs
    serve/     online scoring on Ray Serve
    bench/     benchmark suites, out of the production path

Shared at the top: config (YAML presets + overrides -> typed configs),
storage (URLs -> filesystems, atomic and write-once writes), plots, submission (Ray Jobs API),
local_ray (a local Ray without the console lines a user cannot act on).

Imports point one way: jobs -> batch, train, serve, bench -> model, data, tracking -> the shared
modules above -> flowmodel. Each package's __init__ says what its modules may import, and
tests/test_imports.py holds the code to it and finds no import cycle. Submodules are imported by
name; this package imports nothing itself, so `import pipeline` stays cheap and free of Ray.

May import: flowmodel (the shared modules import each other, and no subpackage).
"""

from __future__ import annotations

__all__: list[str] = []
