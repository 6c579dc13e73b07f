"""MLflow: the tracking connection (URIs, experiments, readable errors) and the model registry
(logging flows, versions, the candidate and champion aliases).

May import: flowmodel, pipeline.model, pipeline.errors.
"""

from __future__ import annotations

__all__: list[str] = []
