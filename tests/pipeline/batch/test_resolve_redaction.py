"""A model whose artifacts cannot be downloaded: the error the batch jobs and serving print says
which model and why, without the signature, credential or token of a presigned URL."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from pipeline.batch.resolve import resolve_batch_model
from pipeline.tracking.registry import ModelNotFound

PRESIGNED = (
    "https://models.s3.amazonaws.com/7/abc/artifacts/flow/model.safetensors"
    "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLEKEY%2F20261206"
    "&X-Amz-Security-Token=IQoJb3JpZ2luX2VjEXAMPLE&X-Amz-Signature=5d672d79c15b13162d9279b0855cfba"
)
SECRETS = ("AKIAEXAMPLEKEY", "IQoJb3JpZ2luX2VjEXAMPLE", "5d672d79c15b13162d9279b0855cfba")


@pytest.mark.parametrize(
    "error",
    [
        MlflowException(f"API request to {PRESIGNED} failed with 403: AccessDenied"),
        OSError(f"403 Client Error: Forbidden for url: {PRESIGNED}"),
    ],
    ids=["mlflow", "artifact-store"],
)
def test_a_failed_download_is_reported_without_the_url_secrets(monkeypatch, error):
    def download_artifacts(artifact_uri: str) -> str:
        raise error

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download_artifacts)
    with pytest.raises(ModelNotFound) as info:
        resolve_batch_model("runs:/0123456789abcdef/flow")
    message = str(info.value)
    assert "runs:/0123456789abcdef/flow" in message and "could not be downloaded" in message
    assert "X-Amz-Signature=***" in message and "X-Amz-Credential=***" in message
    assert [s for s in SECRETS if s in message] == []
    assert info.value.__cause__ is None
