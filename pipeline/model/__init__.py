"""The model artifact and what loading it needs: a flow on disk (safetensors + config JSON) and
in memory (bytes for Ray actors), per-image likelihood with keyed dequantization, and the MLflow
pyfunc flavour with its models-from-code entry.

This subpackage is what a logged model ships (with flowmodel and pipeline.errors), so it may
import only flowmodel and pipeline.errors. Nothing here imports Ray, and only `pyfunc` (the MLflow
adapter, loaded by MLflow itself) imports MLflow.
"""

from __future__ import annotations

__all__: list[str] = []
