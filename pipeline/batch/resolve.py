"""What the batch jobs share: the one model resolver (a model reference -> the flow, its payload
for Ray actors and tasks, and the name and version that key the jobs' outputs, tags and titles)
and the MLflow run that records a job (`log_batch_run`).

    models:/<name>@<alias>, models:/<name>/<version>   name and version from the registry
    runs:/<run id>/<path>                              "run-<first 12 of the run id>", weights hash
    a local model directory                            "local", weights hash (`FlowPayload.digest`)
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowmodel import Flow
from flowmodel.errors import FlowrayError
from pipeline.model.artifact import FlowPayload
from pipeline.storage import redact

LOCAL_NAME = "local"
RUNS_PREFIX = "runs:/"


@dataclass(frozen=True)
class BatchModel:
    """A model ready for a batch job, resolved once on the driver."""

    reference: str  # what the user asked for: a models:/ or runs:/ URI, or a directory
    flow: Flow  # on the driver's CPU, in eval mode
    payload: FlowPayload  # the same weights as bytes, for actors and tasks
    name: str
    version: str

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        channels, height, width = self.flow.config.image_shape
        return channels, height, width


def resolve_batch_model(reference: str) -> BatchModel:
    """Load the model behind `reference` and name it; MLflow's tracking URI must be set first.

    Raises:
        ModelNotFound: the reference names no model, or its artifacts could not be downloaded;
            the message is redacted (a presigned URL or tracking URI may carry secrets).
    """
    from pipeline.tracking.registry import ModelNotFound, resolve_model

    try:
        resolved = resolve_model(reference)
    except FlowrayError as err:
        message, hint = redact(str(err)), redact(err.hint)
        if (message, hint) == (str(err), err.hint):
            raise
        err.args, err.hint = (message,), hint
        raise err from None  # its cause's text holds what the message hid
    except OSError as err:  # the artifact store's own errors (requests', boto's) past MLflow
        raise ModelNotFound(
            f"model {redact(reference)!r} could not be downloaded: "
            f"{redact(f'{type(err).__name__}: {err}')}"
        ) from None
    payload = FlowPayload.from_flow(resolved.flow)
    if resolved.name:
        name, version = resolved.name, str(resolved.version)
    elif resolved.uri.startswith(RUNS_PREFIX):
        run_id = resolved.uri[len(RUNS_PREFIX) :].split("/", 1)[0]
        name, version = f"run-{run_id[:12]}", payload.digest()
    else:
        name, version = LOCAL_NAME, payload.digest()
    return BatchModel(reference, resolved.flow, payload, name, version)


def log_batch_run(
    config: Any,
    tracking_uri: str,
    run_name: str,
    tags: dict[str, str],
    metrics: dict[str, float],
    files: dict[str, bytes],
    artifact_path: str | None = None,
    exclude: tuple[str, ...] = (),
) -> str:
    """A batch job's MLflow run in `config.experiment`: the config as params (less `exclude`; no
    `user:password@` of any URL), the finite metrics, `files` as artifacts; its id."""
    import mlflow

    from pipeline.tracking.connection import ensure_experiment, log_config_params

    experiment_id = ensure_experiment(tracking_uri, config.experiment)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        log_config_params(run.info.run_id, config, exclude=exclude)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if math.isfinite(v)})
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                Path(tmp, name).write_bytes(data)
            mlflow.log_artifacts(tmp, artifact_path=artifact_path)
        return run.info.run_id
