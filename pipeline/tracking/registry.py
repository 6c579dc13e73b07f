"""MLflow model logging, registration and aliases for flows.

A logged flow is a pyfunc "model from code": the entry pipeline/model/pyfunc_entry.py, the `flow`
artifact (model.safetensors + flow_config.json) and the code loading needs, flowmodel/ and a
pipeline/ holding only __init__.py, errors.py and model/ (`SHIPPED_PIPELINE`).

A model version carries tags `val_bits_per_dim` and `image_shape` ("1x28x28", C x H x W);
aliases `candidate` (the newest trained version) and `champion` (the best validation bits/dim)
drive scoring and sampling.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ParamSchema, ParamSpec

from flowmodel import Flow
from pipeline.errors import FlowrayError
from pipeline.model.artifact import load_flow, save_flow

__all__ = [
    "SHIPPED_PIPELINE",
    "ModelNotFound",
    "ModelVersionInfo",
    "Promotion",
    "RegisteredModelInfo",
    "ResolvedModel",
    "list_models",
    "log_flow_model",
    "promote",
    "register_flow",
    "resolve_model",
]

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION = "candidate", "champion"
VAL_TAG = "val_bits_per_dim"
SHAPE_TAG = "image_shape"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# What of pipeline/ a logged model needs to load: pipeline.model imports only flowmodel and
# pipeline.errors. Training, batch jobs, tracking and benchmarks stay out of served models.
SHIPPED_PIPELINE = ("__init__.py", "errors.py", "model")
# FlowPyfunc.predict's params. MLflow drops (with a log line) any predict param its signature does
# not declare; no input schema, because MLflow would then enforce one on the image dict.
PREDICT_SIGNATURE = ModelSignature(
    params=ParamSchema([ParamSpec("seed", "long", 0), ParamSpec("draws", "long", 1)])
)


class ModelNotFound(FlowrayError, LookupError):
    """A model reference that names nothing; the message lists what exists."""

    hint = "check the name and alias with `flowray models list`"


@dataclass(frozen=True)
class Promotion:
    version: str
    promoted: bool
    reason: str


@dataclass(frozen=True)
class ResolvedModel:
    """A loaded flow with where it came from (name/version are empty for a local directory)."""

    flow: Flow
    uri: str
    name: str
    version: str


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered version as `flowray models list` shows it."""

    version: str
    val_bits_per_dim: float  # nan when the version has no tag
    aliases: tuple[str, ...]
    run_id: str
    created: str  # ISO 8601, UTC
    promotion: str  # the last promotion decision recorded on the version


@dataclass(frozen=True)
class RegisteredModelInfo:
    name: str
    aliases: dict[str, str]  # alias -> version
    versions: tuple[ModelVersionInfo, ...]  # newest first


def list_models(name: str | None = None) -> list[RegisteredModelInfo]:
    """Registered models (or the one called `name`), sorted by name, versions newest first.

    Raises:
        ModelNotFound: `name` is given and not registered (the message lists what is).
    """
    from datetime import datetime, timezone

    client = MlflowClient()
    if name is not None:
        try:
            models = [client.get_registered_model(name)]
        except MlflowException as err:
            names = sorted(m.name for m in client.search_registered_models())
            raise ModelNotFound(
                f"no registered model {name!r} (registered: {', '.join(names) or 'none'})"
            ) from err
    else:
        models = sorted(client.search_registered_models(), key=lambda m: m.name)
    result = []
    for model in models:
        by_version: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
        versions = []
        for mv in client.search_model_versions(f"name='{model.name}'"):
            tag = mv.tags.get(VAL_TAG)
            created = datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc)
            versions.append(
                ModelVersionInfo(
                    version=str(mv.version),
                    val_bits_per_dim=float(tag) if tag is not None else math.nan,
                    aliases=tuple(sorted(by_version.get(str(mv.version), []))),
                    run_id=mv.run_id or "",
                    created=created.isoformat(timespec="seconds"),
                    promotion=mv.tags.get("promotion", ""),
                )
            )
        versions.sort(key=lambda v: int(v.version), reverse=True)
        aliases = {alias: str(v) for alias, v in sorted((model.aliases or {}).items())}
        result.append(RegisteredModelInfo(model.name, aliases, tuple(versions)))
    return result


def log_flow_model(flow: Flow, name: str = "model") -> mlflow.models.model.ModelInfo:
    """Log `flow` in the active run as a pyfunc model (code + config JSON + safetensors)."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_flow(flow, Path(tmp) / "flow")
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PACKAGE_ROOT / "pipeline" / "model" / "pyfunc_entry.py"),
            artifacts={"flow": str(model_dir)},
            # The model carries its own code so a serving host needs no flowray install.
            code_paths=_stage_code(Path(tmp) / "code"),
            signature=PREDICT_SIGNATURE,
            # Explicit requirements: inferring them loads the model in a subprocess (slow).
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                "safetensors",
                "numpy",
                "pandas",
                f"mlflow=={mlflow.__version__}",
            ],
            metadata={"flow_config": json.dumps(flow.config.to_dict())},
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


def register_flow(model_uri: str, name: str, val_bits_per_dim: float, run_id: str) -> Promotion:
    """Register `model_uri` (a flow logged by `log_flow_model`) as a new version of `name`, tag
    it with its validation bits/dim and image shape, alias it `candidate`, and move `champion` to
    it when its validation bits/dim beats the champion's. The decision is a version tag."""
    client = MlflowClient()
    shape = _image_shape(model_uri)  # first: a model that is not a flow gets no version
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    # A tracking server refuses a models:/<model id> source without the model_id that owns it
    # (SQLite stores accept it): pass the LoggedModel's id along.
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = str(
        client.create_model_version(name, model_uri, run_id=run_id, model_id=model_id).version
    )
    client.set_model_version_tag(name, version, VAL_TAG, f"{val_bits_per_dim:.6f}")
    client.set_model_version_tag(name, version, SHAPE_TAG, shape)
    client.set_registered_model_alias(name, CANDIDATE, version)
    return promote(name, version, force=False)


def _image_shape(model_uri: str) -> str:
    """The logged flow's (C, H, W) as "1x28x28", from the metadata `log_flow_model` writes."""
    metadata = mlflow.models.get_model_info(model_uri).metadata or {}
    if "flow_config" not in metadata:
        raise ValueError(
            f"{model_uri}: expected a flow logged by log_flow_model (metadata flow_config), "
            f"found metadata keys {sorted(metadata) or 'none'}"
        )
    return "x".join(str(size) for size in json.loads(metadata["flow_config"])["image_shape"])


def _version_bpd(client: MlflowClient, name: str, version: str) -> float:
    tag = client.get_model_version(name, version).tags.get(VAL_TAG)
    return float(tag) if tag is not None else math.inf


def promote(name: str, version: str, force: bool = False, alias: str = CHAMPION) -> Promotion:
    """Point `alias` at `version` if its validation bits/dim is lower than the current holder's
    (or `force`). Records `promotion` on the version either way."""
    client = MlflowClient()
    new = _version_bpd(client, name, str(version))
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    if current is None:
        promoted, reason = True, f"no {alias} yet; {new:.4f} bits/dim"
    elif str(current.version) == str(version):
        promoted, reason = True, f"already {alias}"
    else:
        old = _version_bpd(client, name, str(current.version))
        promoted = force or new < old
        reason = f"{new:.4f} vs {alias} v{current.version} {old:.4f} bits/dim" + (
            " (forced)" if force and new >= old else ""
        )
    if promoted:
        client.set_registered_model_alias(name, alias, str(version))
    client.set_model_version_tag(
        name, str(version), "promotion", f"{alias}: {'yes' if promoted else 'no'}; {reason}"
    )
    log.info(
        "model %s v%s -> %s: %s (%s)",
        name,
        version,
        alias,
        "promoted" if promoted else "kept",
        reason,
    )
    return Promotion(version=str(version), promoted=promoted, reason=reason)


def resolve_model(reference: str) -> ResolvedModel:
    """Load the flow behind `models:/name@alias`, `models:/name/version`, `runs:/...`, or a local
    directory (a saved flow, or an MLflow model directory holding one)."""
    local = Path(reference)
    if local.exists():
        return ResolvedModel(_load_local(local), str(local), "", "")
    name = version = ""
    if reference.startswith("models:/"):
        name, _, rest = reference[len("models:/") :].partition("@")
        client = MlflowClient()
        try:
            if rest:
                version = str(client.get_model_version_by_alias(name, rest).version)
            else:
                name, _, version = reference[len("models:/") :].partition("/")
                client.get_model_version(name, version)
        except MlflowException as err:
            raise ModelNotFound(_not_found_message(client, reference, name)) from err
    elif not reference.startswith("runs:/"):
        raise ModelNotFound(
            f"model {reference!r}: expected models:/<name>@<alias>, models:/<name>/<version>, "
            "runs:/<run_id>/<path> or an existing local directory"
        )
    uri = f"models:/{name}/{version}" if name else reference
    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except MlflowException as err:
        raise ModelNotFound(f"model {reference!r} could not be downloaded: {err.message}") from err
    return ResolvedModel(_load_local(path), reference, name, version)


def _load_local(path: Path) -> Flow:
    for candidate in (path, path / "artifacts" / "flow"):
        if (candidate / "model.safetensors").exists():
            return load_flow(candidate)
    return load_flow(path)  # raises with what is missing


def _not_found_message(client: MlflowClient, reference: str, name: str) -> str:
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models())
        return f"model {reference!r} not found: no registered model {name!r} (registered: {', '.join(names) or 'none'})"
    aliases = ", ".join(f"@{alias} -> v{v}" for alias, v in sorted(model.aliases.items())) or "none"
    return f"model {reference!r} not found: {name!r} has aliases {aliases}"
