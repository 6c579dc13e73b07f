"""The one model resolver of the batch jobs: a model reference -> the flow, its payload for Ray
actors and tasks, and the name and version that key the jobs' outputs, tags and titles.

    models:/<name>@<alias>, models:/<name>/<version>   name and version from the registry
    runs:/<run id>/<path>                              "run-<first 12 of the run id>", weights hash
    a local model directory                            "local", weights hash

The weights hash is the first 12 hex digits of the sha256 of the safetensors weights
(`FlowPayload.digest`), so two different local models never share an output folder.

Errors of the lookup and the download (MLflow's, the artifact store's) reach the user with the
secrets in their text redacted (`pipeline.storage.redact`): a presigned artifact URL carries its
signature and credential in the query string, a tracking URI may carry `user:password@`.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowmodel import Flow
from pipeline.errors import FlowrayError
from pipeline.model.artifact import FlowPayload
from pipeline.storage import redact

__all__ = ["LOCAL_NAME", "BatchModel", "resolve_batch_model"]

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
        """`<name> v<version>`, as titles and log lines show the model."""
        return f"{self.name} v{self.version}"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the flow models."""
        channels, height, width = self.flow.config.image_shape
        return channels, height, width


def resolve_batch_model(reference: str) -> BatchModel:
    """Load the model behind `reference` and name it (see the module docstring).

    MLflow's tracking URI must be set first (registry and runs:/ references read it).

    Raises:
        ModelNotFound: the reference names no model (the message lists what exists), or its
            artifacts could not be downloaded; the message is redacted.
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
