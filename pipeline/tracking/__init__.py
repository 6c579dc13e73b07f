"""MLflow: the tracking connection (URIs, experiments, readable errors), the logged model (a flow as
a pyfunc with its signature and input example) and the model registry (versions, the candidate
and champion aliases).

May import: flowmodel, pipeline.model, pipeline.storage.
"""

from __future__ import annotations

__all__: list[str] = []
