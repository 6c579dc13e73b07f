"""The model artifact and what loading it needs: a flow on disk (safetensors + config JSON) and
in memory (bytes for Ray actors), per-image likelihood with keyed dequantization, and the MLflow
pyfunc flavour with its models-from-code entry; the per-image scores (`scores`) and the
validation calibration a registered version carries (`calibration`: flag threshold, drift verdict).

This subpackage is what a logged model ships (with flowmodel), so it imports nothing else of flowray, and no Ray. Only `pyfunc` (the MLflow adapter) and `pyfunc_entry` (its
models-from-code file, which flowray never imports) import MLflow: MLflow loads them itself. A
scoring actor loads flows through `artifact` and `likelihood`.

May import: flowmodel.
Third-party imports: torch, numpy, pandas, PIL, safetensors, mlflow.
"""

from __future__ import annotations

__all__: list[str] = []
