"""The MLflow pyfunc flavour of a flow: `predict(uint8 images) -> log-likelihood and bits/dim`.

Logged as "models from code": MLflow runs pipeline/model/pyfunc_entry.py, which instantiates
FlowPyfunc, so nothing is pickled; the weights are the safetensors artifact (pipeline.model.artifact).
This is the one module of pipeline.model that imports MLflow: MLflow loads it itself.

The serving contract (also what `flowray serve` answers, pipeline.serve):
- input: images as a tensor [B, C, H, W] of integers in 0..255 (the signature says uint8; a JSON
  body's numbers are cast to it by MLflow's scoring server before the model sees them);
- params: `keys` (one string per image), `seed` (0) and `draws` (1). The dequantization noise of
  an image is seeded by (seed, key), so an image scored with its `flowray score` key (the Parquet
  `key` column) and the score job's seed gets exactly the bits/dim the score job wrote. Without
  keys, an image's key is a digest of its pixels (`content_key`): the same image gets the same
  bits/dim in any batch and at any position, here and in `flowray serve` alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from pipeline.model.artifact import load_flow
from pipeline.model.likelihood import predict_frame

PIXEL_MAX = 255


def as_uint8_images(values: Any, shape: Sequence[int]) -> np.ndarray:
    """`values` as uint8 [B, C, H, W] with (C, H, W) == `shape`; a ValueError otherwise.

    Any integer dtype is accepted when every value lies in 0..255 (JSON numbers arrive as int64);
    floats, booleans, strings and out-of-range values are refused rather than rounded or wrapped.
    """
    array = np.asarray(values)
    expected = f"[B, {', '.join(str(s) for s in shape)}]"
    if array.dtype.kind not in "iu":
        raise ValueError(
            f"images: expected integers 0..{PIXEL_MAX} shaped {expected}, found dtype "
            f"{array.dtype} {list(array.shape)}"
        )
    if array.ndim != 4 or tuple(array.shape[1:]) != tuple(shape) or array.shape[0] == 0:
        raise ValueError(f"images: expected shape {expected} (B >= 1), found {list(array.shape)}")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > PIXEL_MAX:
        raise ValueError(
            f"images: expected values in 0..{PIXEL_MAX}, found values from {low} to {high}"
        )
    return np.ascontiguousarray(array, dtype=np.uint8)


def content_key(image: np.ndarray) -> str:
    """The key of an image given without one: `sha256:` + 16 hex digits of its uint8 pixels."""
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]


def image_keys(images: np.ndarray, keys: Sequence[Any] | None) -> list[str]:
    """`keys` as strings, one per image; `content_key` of each image when none are given."""
    if keys is None or len(keys) == 0:
        return [content_key(image) for image in images]
    if len(keys) != len(images):
        raise ValueError(f"keys: expected one per image ({len(images)}), found {len(keys)}")
    return [str(key) for key in keys]


class FlowPyfunc(mlflow.pyfunc.PythonModel):
    """The serving contract of the module docstring; output: key, log_likelihood, bits_per_dim."""

    def load_context(self, context: Any) -> None:
        self.flow = load_flow(context.artifacts["flow"])

    # np.ndarray is a hint MLflow infers no schema from: the logged signature stays the one
    # schema (a hint like list[...] would replace it), and MLflow does not warn about a missing
    # hint while logging.
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        params = params or {}
        try:
            images = as_uint8_images(model_input, self.flow.config.image_shape)
            keys = image_keys(images, params.get("keys"))
        except ValueError as err:
            # An MlflowException reaches a REST client as a 400 carrying this message; any
            # other error becomes a generic "unexpected error" with the message in a traceback.
            raise MlflowException.invalid_parameter_value(str(err)) from err
        return predict_frame(
            self.flow, images, keys, int(params.get("seed", 0)), int(params.get("draws", 1))
        )
