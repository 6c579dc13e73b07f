"""Typed configs from plain dicts: unknown keys and wrong types fail with the key's dotted name.
Every config in flowray is a frozen dataclass parsed by `from_dict`, so YAML files, CLI overrides,
MLflow params and checkpoint JSON all go through one validator.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from flowmodel.errors import FlowrayError

T = TypeVar("T")


class ConfigError(FlowrayError, ValueError):
    """A config value is missing, unknown or of the wrong type; the message names the key. A
    ValueError too, like those that config classes raise from `__post_init__`."""

    hint = "see the job's --help; config keys are the dataclass fields of the job's config"


# What each scalar type is called in errors, and the Python types it accepts (never a bool for a
# number: YAML's `true` is not 1).
_SCALARS: dict[type, tuple[str, type | tuple[type, ...]]] = {
    bool: ("true or false", bool),
    int: ("an integer", int),
    float: ("a number", (int, float)),
    str: ("a string", str),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:
            # `X | None` given a value: X's own error names the exact key (`a.b[2]`) and what X
            # expects, which a message about the whole union would hide.
            return _coerce(value, options[0], key)
        for arg in options:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, found {value!r}")
    if origin is typing.Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {list(allowed)}, found {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, found {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(
                    f"{key}: expected {len(args)} items, found {len(value)}: {value!r}"
                )
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            inner = args[0] if args else Any
            items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, found {value!r}")
        _, vt = get_args(tp) or (str, Any)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, prefix=f"{key}.")
    if tp in _SCALARS:
        what, accepted = _SCALARS[tp]
        if not isinstance(value, accepted) or (tp is not bool and isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {what}, found {value!r}")
        return float(value) if tp is float else value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking keys and types; defaults fill the rest.

    Raises:
        ConfigError: an unknown or missing key, or a value of the wrong type.
    """
    if not isinstance(data, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, found {data!r}"
        )
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]} (known keys: {', '.join(prefix + k for k in fields)})"
        )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {prefix}{name}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from err


def to_dict(config: Any) -> Any:
    """A JSON-ready copy (a config becomes a dict, tuples lists) that `from_dict` turns back into
    the same config."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: MLflow params from a resolved config."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_required(config: object, *names: str) -> None:
    """ValueError naming the first of `names` that is empty on `config`."""
    for name in names:
        if not getattr(config, name):
            raise ValueError(f"{name}: required, found an empty value")


def check_at_least(config: object, bound: int, *names: str) -> None:
    """ValueError naming the first of `names` whose value on `config` is below `bound`."""
    for name in names:
        if getattr(config, name) < bound:
            raise ValueError(f"{name}: expected >= {bound}, found {getattr(config, name)}")


# One entry of a Google-style "Attributes:" section: "name: text" or "name, other: text".
_ATTRIBUTE = re.compile(r"^(?P<names>[A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*):\s*(?P<text>.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's text from the "Attributes:" section of `cls`'s docstring, continuation lines
    joined: the one place a config field is described, read by the jobs' --help. An entry may
    name several fields ("host, port: ...") that share the text."""
    lines = (inspect.getdoc(cls) or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return {}
    docs: dict[str, str] = {}
    names: list[str] = []
    indent = None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:
            break  # the next section
        indent = depth if indent is None else indent
        match = _ATTRIBUTE.match(line.strip()) if depth == indent else None
        if match:
            names = [name.strip() for name in match["names"].split(",")]
            for name in names:
                docs[name] = match["text"].strip()
        else:
            for name in names:
                docs[name] = f"{docs[name]} {line.strip()}".strip()
    return docs
