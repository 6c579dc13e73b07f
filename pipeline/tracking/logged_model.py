"""A flow logged to MLflow: a pyfunc "model from code" with a signature and an input example.

The model holds the entry pipeline/model/pyfunc_entry.py, the `flow` artifact (model.safetensors +
flow_config.json) and the code loading needs: flowmodel/ and a pipeline/ holding only __init__.py,
errors.py and model/ (`SHIPPED_PIPELINE`). Nothing is pickled, so loading a model runs no code but
ours, and a serving host needs no flowray install.

Its signature is what `mlflow models serve` enforces: a uint8 tensor [-1, C, H, W] and the params
keys, seed and draws (see pipeline.model.pyfunc for their meaning). Its input example is a few of
the flow's own samples (or images the caller gives); MLflow answers it once while logging, so a
model whose example does not serve is caught here and not at the first request.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models.model import ModelInfo
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

from flowmodel import Flow
from pipeline.model.artifact import save_flow
from pipeline.model.noise import noise_scheme_of
from pipeline.tracking.connection import quiet_mlflow

__all__ = [
    "EXAMPLE_IMAGES",
    "SHIPPED_PIPELINE",
    "example_images",
    "flow_signature",
    "log_flow_model",
]

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# What of pipeline/ a logged model needs to load: pipeline.model imports only flowmodel and
# pipeline.errors. Training, batch jobs, tracking and benchmarks stay out of served models.
SHIPPED_PIPELINE = ("__init__.py", "errors.py", "model")
EXAMPLE_IMAGES = 2  # enough to show the batch axis, small in the UI and in the MLmodel folder
EXAMPLE_TEMPERATURE = 0.7  # the temperature sample grids use: images that look like the data


def flow_signature(image_shape: tuple[int, ...]) -> ModelSignature:
    """uint8 images [-1, C, H, W] in; params keys ([]: content keys), seed (0), draws (1).

    MLflow drops (with a log line) any predict param the signature does not declare, so every
    param FlowPyfunc reads is declared here.
    """
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *image_shape))]),
        params=ParamSchema(
            [
                ParamSpec("keys", "string", [], (-1,)),
                ParamSpec("seed", "long", 0),
                ParamSpec("draws", "long", 1),
            ]
        ),
    )


def example_images(flow: Flow, count: int = EXAMPLE_IMAGES) -> np.ndarray:
    """`count` samples of `flow` (uint8 [count, C, H, W]), seeded so a rerun logs the same ones."""
    generator = torch.Generator().manual_seed(0)
    return flow.sample(count, temperature=EXAMPLE_TEMPERATURE, generator=generator).numpy()


def log_flow_model(
    flow: Flow, name: str = "model", input_example: np.ndarray | None = None
) -> ModelInfo:
    """Log `flow` in the active run as a pyfunc model (code + config JSON + safetensors), with
    its signature and `input_example` (uint8 [B, C, H, W]; default: `example_images(flow)`)."""
    shape = tuple(flow.config.image_shape)
    example = example_images(flow) if input_example is None else input_example
    if example.dtype != np.uint8 or tuple(example.shape[1:]) != shape:
        raise ValueError(
            f"input_example: expected uint8 [B, {', '.join(map(str, shape))}], found "
            f"{example.dtype} {list(example.shape)}"
        )
    with tempfile.TemporaryDirectory() as tmp, quiet_mlflow():
        model_dir = save_flow(flow, Path(tmp) / "flow")
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PACKAGE_ROOT / "pipeline" / "model" / "pyfunc_entry.py"),
            artifacts={"flow": str(model_dir)},
            # The model carries its own code so a serving host needs no flowray install.
            code_paths=_stage_code(Path(tmp) / "code"),
            signature=flow_signature(shape),
            input_example=example,
            # Explicit requirements: inferring them loads the model in a subprocess (slow).
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                "safetensors",
                "numpy",
                "pandas",
                f"mlflow=={mlflow.__version__}",
            ],
            # The noise scheme is part of the model (scores depend on it); also in the artifact's
            # flow_config.json, from which the model loads it.
            metadata={
                "flow_config": json.dumps(flow.config.to_dict()),
                "noise_scheme": noise_scheme_of(flow),
            },
        )


def _stage_code(folder: Path) -> list[str]:
    """flowmodel/ and a pipeline/ with only `SHIPPED_PIPELINE`, copied under `folder`; MLflow
    copies each listed path into the model's code/ folder by its name."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(PACKAGE_ROOT / "flowmodel", folder / "flowmodel", ignore=skip)
    for item in SHIPPED_PIPELINE:
        source, target = PACKAGE_ROOT / "pipeline" / item, folder / "pipeline" / item
        if source.is_dir():
            shutil.copytree(source, target, ignore=skip)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return [str(folder / "flowmodel"), str(folder / "pipeline")]
