"""The model registry: flows registered as versions, the candidate and champion aliases, listing
and resolving model references.

A model version carries tags `val_bits_per_dim` and `image_shape` ("1x28x28", C x H x W);
aliases `candidate` (the newest trained version) and `champion` (the best validation bits/dim)
drive scoring, sampling and serving. Registration goes through `mlflow.register_model`, which
creates the registered model when needed and links the version to the logged model and its run.
A version without a finite validation bits/dim is never registered and never becomes champion.
Logging the model itself is pipeline.tracking.logged_model (re-exported here).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flowmodel import Flow
from pipeline.errors import FlowrayError
from pipeline.model.artifact import load_flow
from pipeline.tracking.logged_model import SHIPPED_PIPELINE, log_flow_model, quiet_mlflow

__all__ = [
    "CANDIDATE",
    "CHAMPION",
    "SHIPPED_PIPELINE",
    "ModelNotFound",
    "ModelVersionInfo",
    "Promotion",
    "RegisteredModelInfo",
    "RegistrationError",
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


class ModelNotFound(FlowrayError, LookupError):
    """A model reference that names nothing; the message lists what exists."""

    hint = "check the name and alias with `flowray models list`"


class RegistrationError(FlowrayError, RuntimeError):
    """A model that must not be registered or promoted: no finite validation bits/dim."""

    hint = (
        "a version is registered and promoted only with a finite validation bits/dim: check "
        "that training evaluated on data.validation (its log shows val bits/dim)"
    )
    exit_code = 1  # a runtime failure (jobs.errors.EXIT_FAILURE): the run produced no figure


@dataclass(frozen=True)
class Promotion:
    """What `register_flow` and `promote` decided; `reason` is the line the jobs print."""

    version: str
    promoted: bool
    reason: str  # "now champion (no previous champion)", "champion stays v2 (3.4100 < 3.4500)"
    previous: str = ""  # the alias's holder before the decision ("" when it had none)


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


def register_flow(
    model_uri: str, name: str, val_bits_per_dim: float, run_id: str | None = None
) -> Promotion:
    """Register `model_uri` (a flow logged by `log_flow_model`) as a new version of `name`, tagged
    with its validation bits/dim and image shape, alias it `candidate`, and move `champion` to it
    when its validation bits/dim beats the champion's (`promote`).

    `run_id` is not needed: MLflow links the version to the run that logged the model. It stays
    in the signature for callers that pass it.

    Raises:
        RegistrationError: `val_bits_per_dim` is not a finite number (NaN, None, empty); nothing
            is registered.
        ValueError: `model_uri` is not a flow logged by `log_flow_model`; nothing is registered.
    """
    del run_id  # MLflow reads the run from the logged model
    if not _finite(val_bits_per_dim):
        raise RegistrationError(
            f"cannot register {model_uri} as {name}: expected a finite validation bits/dim, "
            f"found {val_bits_per_dim!r}; nothing was registered"
        )
    shape = _image_shape(model_uri)  # first: a model that is not a flow gets no version
    tags = {VAL_TAG: f"{float(val_bits_per_dim):.6f}", SHAPE_TAG: shape}
    # register_model prints "Successfully registered model ..." / "Created version ..." to
    # stderr; the jobs print the decision instead (Promotion.reason).
    printed = io.StringIO()
    with quiet_mlflow(), contextlib.redirect_stderr(printed):
        version = str(mlflow.register_model(model_uri, name, tags=tags).version)
    log.debug("mlflow.register_model: %s", printed.getvalue().strip())
    MlflowClient().set_registered_model_alias(name, CANDIDATE, version)
    return promote(name, version, force=False)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _image_shape(model_uri: str) -> str:
    """The logged flow's (C, H, W) as "1x28x28", from the metadata `log_flow_model` writes."""
    with quiet_mlflow():  # it downloads MLmodel, with a progress bar
        metadata = mlflow.models.get_model_info(model_uri).metadata or {}
    if "flow_config" not in metadata:
        raise ValueError(
            f"{model_uri}: expected a flow logged by log_flow_model (metadata flow_config), "
            f"found metadata keys {sorted(metadata) or 'none'}"
        )
    return "x".join(str(size) for size in json.loads(metadata["flow_config"])["image_shape"])


def _version_bpd(client: MlflowClient, name: str, version: str) -> tuple[float, str | None]:
    """The version's validation bits/dim (NaN when its tag is missing or not a number) and the
    tag as stored."""
    tag = client.get_model_version(name, version).tags.get(VAL_TAG)
    try:
        return float(tag), tag  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan, tag


def promote(name: str, version: str, force: bool = False, alias: str = CHAMPION) -> Promotion:
    """Point `alias` at `version` if its validation bits/dim is lower than the current holder's
    (or `force`). Records the decision as the version's `promotion` tag either way.

    Raises:
        RegistrationError: `version` has no finite validation bits/dim: it never becomes `alias`,
            even with `force`.
    """
    client = MlflowClient()
    version = str(version)
    new, tag = _version_bpd(client, name, version)
    if not math.isfinite(new):
        raise RegistrationError(
            f"{name} v{version} cannot become {alias}: expected a finite {VAL_TAG} tag, "
            f"found {tag!r}"
        )
    try:
        current: str | None = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        current = None
    promoted, reason = _decide(client, name, version, new, current, force, alias)
    if promoted:
        client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "promotion", reason)
    log.info("model %s v%s: %s", name, version, reason)
    return Promotion(version=version, promoted=promoted, reason=reason, previous=current or "")


def _decide(
    client: MlflowClient,
    name: str,
    version: str,
    new: float,
    current: str | None,
    force: bool,
    alias: str,
) -> tuple[bool, str]:
    """Whether `version` (validation bits/dim `new`) takes `alias` from `current`, and why, in
    the words the jobs print: "now champion (3.4100 < v2's 3.4500)"."""
    if current is None:
        return True, f"now {alias} (no previous {alias})"
    if current == version:
        return True, f"already {alias}"
    old, _ = _version_bpd(client, name, current)
    if not math.isfinite(old):  # a version registered before figures were required
        return True, f"now {alias} (v{current} has no validation bits/dim)"
    if new < old:
        return True, f"now {alias} ({new:.4f} < v{current}'s {old:.4f})"
    if force:
        return True, f"now {alias}, forced ({new:.4f} >= v{current}'s {old:.4f})"
    relation = "<" if old < new else "="
    return False, f"{alias} stays v{current} ({old:.4f} {relation} {new:.4f})"


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
