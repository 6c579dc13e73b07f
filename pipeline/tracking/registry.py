"""The model registry: flows registered as versions, the candidate and champion aliases, listing
and resolving model references.

A version carries tags `val_bits_per_dim` and `image_shape` ("1x28x28", C x H x W); aliases
`candidate` (the newest trained version) and `champion` (the best validation bits/dim) drive
scoring, sampling and serving. A version without a finite validation bits/dim is never registered
and never becomes champion; a registered name holds one image shape (`ShapeMismatch` at
registration and promotion), since scoring and serving by alias assume the shape stays.

A version may carry its calibration (pipeline.model.calibration): `calibration/v<version>.json`
on the version's run, named by its tag `calibration`, and tags with its figures
(`store_calibration`). Training stores it at registration; `flowray models calibrate` does for
older versions.

A version's model is a pyfunc "model from code" (`log_flow_model`): the entry
pipeline/model/pyfunc_entry.py, the `flow` artifact (model.safetensors + flow_config.json) and
the code loading needs (flowmodel/ and `SHIPPED_PIPELINE` of pipeline/). Nothing is pickled, so
loading runs no code but ours, and a serving host needs no flowray install. Its signature is what
`mlflow models serve` enforces; MLflow answers its input example once while logging, so a model
that does not serve is caught here and not at the first request.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo
from mlflow.models.signature import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

from flowmodel import Flow
from flowmodel.errors import FlowrayError
from pipeline.model.artifact import load_flow, save_flow
from pipeline.model.calibration import Calibration
from pipeline.model.noise import noise_scheme_of
from pipeline.storage import redact_url
from pipeline.tracking.connection import quiet_mlflow

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION = "candidate", "champion"
VAL_TAG = "val_bits_per_dim"
SHAPE_TAG = "image_shape"
CALIBRATION_TAG = "calibration"  # where the version's calibration JSON is (a runs:/ URI)


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


class ShapeMismatch(RegistrationError):
    """A version whose image shape differs from the other versions of its registered name."""

    hint = (
        "one registered name holds one image shape (scoring and serving by alias rely on it): "
        "register this model under a new name, e.g. train with "
        "--set mlflow.registered_model=<name>-<C>x<H>x<W>"
    )


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
    val_bits_per_dim: float  # nan when the version has no numeric tag
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
    """Registered models (or the one called `name`: ModelNotFound, listing what is, when it is
    not registered), sorted by name, versions newest first."""
    from datetime import datetime, timezone

    client = MlflowClient()
    if name is not None:
        try:
            models = [client.get_registered_model(name)]
        except MlflowException as err:
            raise ModelNotFound(_unregistered(client, name)) from err
    else:
        models = sorted(client.search_registered_models(), key=lambda m: m.name)
    result = []
    for model in models:
        aliases = {alias: str(v) for alias, v in sorted((model.aliases or {}).items())}
        versions = []
        for mv in client.search_model_versions(f"name='{model.name}'"):
            created = datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc)
            versions.append(
                ModelVersionInfo(
                    version=str(mv.version),
                    val_bits_per_dim=_bits_per_dim(mv.tags),
                    aliases=tuple(a for a, v in aliases.items() if v == str(mv.version)),
                    run_id=mv.run_id or "",
                    created=created.isoformat(timespec="seconds"),
                    promotion=mv.tags.get("promotion", ""),
                )
            )
        versions.sort(key=lambda v: int(v.version), reverse=True)
        result.append(RegisteredModelInfo(model.name, aliases, tuple(versions)))
    return result


def register_flow(
    model_uri: str,
    name: str,
    val_bits_per_dim: float,
    run_id: str | None = None,
    calibration: Calibration | None = None,
) -> Promotion:
    """Register `model_uri` (a flow logged by `log_flow_model`) as a new version of `name`, tagged
    with its validation bits/dim and image shape (and `calibration`, stored with it), alias it
    `candidate`, and move `champion` to it when its validation bits/dim beats the champion's
    (`promote`). MLflow links the version to the run that logged the model: `run_id` is unused.

    Raises:
        RegistrationError: `val_bits_per_dim` is not a finite number (NaN, None, empty); nothing
            is registered.
        ShapeMismatch: `name` has versions of another image shape; nothing is registered.
        ValueError: `model_uri` is not a flow logged by `log_flow_model`; nothing is registered."""
    del run_id  # MLflow reads the run from the logged model
    if not _finite(val_bits_per_dim):
        raise RegistrationError(
            f"cannot register {model_uri} as {name}: expected a finite validation bits/dim, "
            f"found {val_bits_per_dim!r}; nothing was registered"
        )
    shape = _image_shape(model_uri)  # first: a model that is not a flow gets no version
    _check_shape(MlflowClient(), name, shape, f"cannot register {model_uri} as {name}")
    tags = {VAL_TAG: f"{float(val_bits_per_dim):.6f}", SHAPE_TAG: shape}
    # register_model prints "Successfully registered model ..." / "Created version ..." to
    # stderr; the jobs print the decision instead (Promotion.reason).
    printed = io.StringIO()
    with quiet_mlflow(), contextlib.redirect_stderr(printed):
        version = str(mlflow.register_model(model_uri, name, tags=tags).version)
    log.debug("mlflow.register_model: %s", printed.getvalue().strip())
    if calibration is not None:
        store_calibration(name, version, calibration)
    MlflowClient().set_registered_model_alias(name, CANDIDATE, version)
    return promote(name, version, force=False)


def store_calibration(name: str, version: str, calibration: Calibration) -> str:
    """Log `calibration` as `calibration/v<version>.json` on the version's run and tag the version
    with where it is and its figures (module docstring); returns its runs:/ URI.
    RegistrationError when the version has no run to hold the file."""
    client = MlflowClient()
    run_id = client.get_model_version(name, version).run_id
    if not run_id:
        raise RegistrationError(
            f"cannot calibrate {name} v{version}: expected a version linked to a run (its "
            "calibration file goes there), found none"
        )
    path = f"calibration/v{version}.json"
    with quiet_mlflow():
        client.log_dict(run_id, calibration.to_dict(), path)
    uri = f"runs:/{run_id}/{path}"
    for key, value in {**calibration.tags(), CALIBRATION_TAG: uri}.items():
        client.set_model_version_tag(name, version, key, value)
    return uri


def load_calibration(name: str, version: str) -> Calibration | None:
    """The calibration stored with `name` v`version`, None when it has none."""
    uri = MlflowClient().get_model_version(name, version).tags.get(CALIBRATION_TAG)
    if not uri:
        return None
    with quiet_mlflow():
        return Calibration.from_dict(mlflow.artifacts.load_dict(uri))


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
    return shape_tag(json.loads(metadata["flow_config"])["image_shape"])


def shape_tag(shape: Sequence[int]) -> str:
    """(C, H, W) as the `image_shape` tag writes it: "1x28x28"."""
    return "x".join(str(size) for size in shape)


def _check_shape(
    client: MlflowClient, name: str, shape: str, doing: str, skip: str | None = None
) -> None:
    """Raise ShapeMismatch when a version of `name` (other than `skip`) is tagged with another
    image shape than `shape`; versions without the tag are not compared."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:  # no such registered model yet
        return
    for version in sorted(versions, key=lambda v: int(v.version)):
        other = version.tags.get(SHAPE_TAG)
        if str(version.version) != skip and other and other != shape:
            raise ShapeMismatch(
                f"{doing}: expected image shape {other} (the shape of {name} "
                f"v{version.version}), found {shape}"
            )


def _bits_per_dim(tags: dict[str, str]) -> float:
    """A version's validation bits/dim, NaN when its tag is missing or not a number."""
    try:
        return float(tags.get(VAL_TAG))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def promote(name: str, version: str, force: bool = False, alias: str = CHAMPION) -> Promotion:
    """Point `alias` at `version` if its validation bits/dim is lower than the current holder's
    (or `force`). Records the decision as the version's `promotion` tag either way. Even with
    `force`, a version without a finite validation bits/dim (RegistrationError) or of another
    image shape than the other versions of `name` (ShapeMismatch) never becomes `alias`.
    """
    client = MlflowClient()
    version = str(version)
    tags = client.get_model_version(name, version).tags
    if tags.get(SHAPE_TAG):
        doing = f"{name} v{version} cannot become {alias}"
        _check_shape(client, name, tags[SHAPE_TAG], doing, version)
    new = _bits_per_dim(tags)
    if not math.isfinite(new):
        raise RegistrationError(
            f"{name} v{version} cannot become {alias}: expected a finite {VAL_TAG} tag, "
            f"found {tags.get(VAL_TAG)!r}"
        )
    try:
        current = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        current = ""
    held = current not in ("", version)
    old = _bits_per_dim(client.get_model_version(name, current).tags) if held else math.nan
    promoted, reason = _decide(alias, version, current, new, old, force)
    if promoted:
        client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "promotion", reason)
    log.info("model %s v%s: %s", name, version, reason)
    return Promotion(version=version, promoted=promoted, reason=reason, previous=current)


def _decide(
    alias: str, version: str, current: str, new: float, old: float, force: bool
) -> tuple[bool, str]:
    """Whether `version` (validation bits/dim `new`) takes `alias` from `current` (`old`; "" when
    none holds it), and why, in the words the jobs print: "now champion (3.4100 < v2's 3.4500)"."""
    if not current:
        return True, f"now {alias} (no previous {alias})"
    if current == version:
        return True, f"already {alias}"
    if not math.isfinite(old):  # a version without the tag (an older flowray's)
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
        return f"model {reference!r} not found: {_unregistered(client, name)}"
    aliases = ", ".join(f"@{alias} -> v{v}" for alias, v in sorted(model.aliases.items())) or "none"
    return f"model {reference!r} not found: {name!r} has aliases {aliases} (searched {_searched()})"


def _unregistered(client: MlflowClient, name: str) -> str:
    names = ", ".join(sorted(m.name for m in client.search_registered_models())) or "none"
    return f"no registered model {name!r} (registered: {names}; searched {_searched()})"


def _searched() -> str:
    """The tracking URI a lookup searched, for "not found" messages (credentials stripped)."""
    return redact_url(mlflow.get_tracking_uri())


PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# What of pipeline/ a logged model needs to load: pipeline.model imports only flowmodel.
# Training, batch jobs, tracking and benchmarks stay out of served models.
SHIPPED_PIPELINE = ("__init__.py", "model")
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
