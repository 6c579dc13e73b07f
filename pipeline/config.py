"""The one config loader: a YAML file or preset, then `key.path=value` overrides (parsed as YAML
scalars, as a file would give them), then a job's own options, then typed validation that names
the dotted key of an unknown key or wrong type.

    config = load_config(TrainConfig, "fashion-mnist", ["optim.lr=3e-4"], {"run.address": address})
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml

from flowmodel.typed import ConfigError, from_dict

T = TypeVar("T")
# The presets ship with the jobs package (package data); this module only reads them.
PRESETS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


class _ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-4` as a string (its floats need a dot: 3.0e-4); a config means the
    number, as YAML 1.2 and JSON do."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _parse(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader: plain data only


def preset_path(name_or_path: str) -> Path:
    """A config file path, or a preset name from jobs/configs (`fashion-mnist` -> .../fashion-mnist.yaml)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    preset = PRESETS / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
    raise ConfigError(
        f"config {name_or_path!r}: no such file and no such preset (presets: {names})"
    )


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested dict (copied); values parse as YAML scalars."""
    result = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        _set(result, key, _parse(raw) if raw else "", f"--set {item!r}")
    return result


def _set(data: dict[str, Any], key: str, value: Any, source: str) -> None:
    """data["a"]["b"]["c"] = value for key "a.b.c", creating sections on the way."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"{source}: expected {part} to be a section, found the value {child!r}"
            )
        node = child
    node[parts[-1]] = value


def load_config(
    cls: type[T],
    path: str | None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> T:
    """YAML at `path` (a file or preset name; None: defaults only), then `--set` overrides, then
    `flags` (dotted key -> value, used as it is; None: not given), validated by `from_dict`."""
    data: Any = {}
    if path:
        file = preset_path(path)
        data = _parse(file.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"{file}: expected a mapping at the top level, found {type(data).__name__}"
            )
    data = apply_overrides(data, overrides or [])
    for key, value in (flags or {}).items():
        if value is not None:
            _set(data, key, value, f"option for {key}")
    return from_dict(cls, data)
