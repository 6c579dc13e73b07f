"""Job configuration: a YAML preset, then `--set key.path=value` overrides, then typed validation.

    config = load_config(TrainConfig, "jobs/configs/fashion-mnist.yaml", ["optim.lr=3e-4"])

Override values are parsed as YAML scalars (3e-4 -> float, true -> bool, [1, 28, 28] -> list), so
the typed validator sees the same types a YAML file would give. Unknown keys and wrong types fail
before anything starts, naming the dotted key.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TypeVar

import yaml

from flowmodel.typed import ConfigError, from_dict

__all__ = ["ConfigError", "add_config_arguments", "apply_overrides", "load_config", "preset_path"]

T = TypeVar("T")
PRESETS = Path(__file__).resolve().parent / "configs"


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
    result = _copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    return result


def _copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def load_config(cls: type[T], path: str | None, overrides: list[str] | None = None) -> T:
    """Read YAML at `path` (a file or preset name; None = defaults only), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path:
        file = preset_path(path)
        loaded = yaml.safe_load(file.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{file}: expected a mapping at the top level, found {type(loaded).__name__}"
            )
        data = loaded
    return from_dict(cls, apply_overrides(data, overrides or []))


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    """The --config / --set pair every job takes."""
    parser.add_argument(
        "--config",
        default=default_config,
        help=f"YAML config file or preset name from jobs/configs (default: {default_config})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set optim.lr=3e-4 (repeatable)",
    )
