"""flowray's distributed and stateful parts, in subpackages that follow the data:

    data/      images on storage: sources, prepared shards + manifest, readers (Ray Data, iterator)
    train/     TrainConfig, the pure step, the Ray Train worker loop, the driver, checkpoints
    model/     the model artifact, per-image likelihood, the MLflow pyfunc (what a model ships)
    tracking/  the MLflow connection and the registry
    batch/     scoring and sampling jobs
    bench/     benchmark suites, out of the production path

Shared at the top: errors (FlowrayError), config (YAML presets + overrides -> typed configs),
storage (URLs -> filesystems, atomic writes), plots,
submission (Ray Jobs API). Imports point one way: jobs -> batch, train, bench -> model, data,
tracking -> flowmodel. Submodules are imported by name; this package imports nothing itself, so
`import pipeline` stays cheap and free of Ray.
"""

from __future__ import annotations

__all__: list[str] = []
