"""The command line of every job, read off its config dataclass: each option is declared once, as
a field with its default and its "Attributes:" docstring entry, and becomes a flag here.

    parser = config_parser("flowray score", "Score every image ...", ScoreConfig)
    args = parser.parse_args(argv)
    config = config_from_args(ScoreConfig, args)   # --config, then --set, then the flags

One precedence for every job: `--config` file (or preset), then `--set key=value`, then flags (a
flag not given changes nothing). A flat config gets one flag per field (`batch_size` ->
`--batch-size`; a bool -> `--<name>`, or `--no-<name>` when it defaults to on); sections are
reached with `--set storage.read_timeout=60`, except `STANDARD_FLAGS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from flowmodel.typed import field_docs
from pipeline.config import load_config

T = TypeVar("T")

# Dotted config keys that every job spells the same way, whichever section holds them.
STANDARD_FLAGS: dict[str, tuple[str, ...]] = {
    "storage.endpoint_url": ("--endpoint-url",),
    "storage.region": ("--region",),
}
_DEST = "config:"  # argparse dest prefix of an option that sets a config key


class HelpFormatter(argparse.HelpFormatter):
    """The help style of every command: each option ends with exactly one `(default: ...)`,
    added unless the text says it already (on/off for flags, "none" for an empty list, nothing
    for None: such an option says in its text what happens without it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "(default" in text or not action.option_strings or default in (None, argparse.SUPPRESS):
            return text
        if isinstance(default, bool):
            shown = "on" if default else "off"
        elif isinstance(default, (list, tuple)) and not default:
            shown = "none"
        else:
            shown = "%(default)s"  # argparse fills it in
        return f"{text} (default: {shown})"


def job_parser(prog: str, description: str, **kwargs: Any) -> argparse.ArgumentParser:
    """An ArgumentParser in the house style (HelpFormatter, no abbreviated options)."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=HelpFormatter,
        allow_abbrev=False,
        **kwargs,
    )


def add_subcommands(parser: argparse.ArgumentParser, *names: str) -> Any:
    """The subcommands of `parser` (`args.command`), each parser in the house help style."""
    return parser.add_subparsers(
        dest="command",
        metavar="{" + ",".join(names) + "}",
        parser_class=functools.partial(argparse.ArgumentParser, formatter_class=HelpFormatter),
    )


def config_parser(
    prog: str,
    description: str,
    cls: type,
    *,
    flags: Mapping[str, Sequence[str]] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    address: str = "",
    default_config: str | None = None,
    flat: bool = True,
) -> argparse.ArgumentParser:
    """The parser of a job: --config/--set, one option per config key (help and default from
    the dataclass), the job's `extra` options, then, for a flat config, --address and -v.

    Args:
        flags: dotted key -> option strings, for keys inside sections and for a field whose
            flag is not `--<field-name>`; STANDARD_FLAGS are added where `cls` has them.
        address: what --address is used for, when not for the whole job.
        default_config: the --config used when none is given.
        flat: a flag for each top-level field that is not a section; a config of sections
            names its flags (--address and -v among them) in `flags`.
    """
    parser = job_parser(prog, description)
    parser.add_argument(
        "--config",
        default=default_config,
        help="YAML config file or preset name from jobs/configs "
        f"(default: {default_config or 'none: flags and --set only'})",
    )
    add_set_argument(
        parser,
        "override one config value, e.g. --set batch_size=128 or --set "
        "storage.read_timeout=60; after --config, before flags (repeatable)",
    )
    chosen: dict[str, Sequence[str]] = {}
    hints = get_type_hints(cls)
    if flat:
        for item in dataclasses.fields(cls):
            if item.init and not _is_section(hints[item.name]):
                chosen[item.name] = (f"--{item.name.replace('_', '-')}",)
    chosen.update({key: o for key, o in STANDARD_FLAGS.items() if _has_key(cls, key)})
    chosen.update(flags or {})
    for key, options in chosen.items():
        _add_option(parser, cls, key, options)
    if extra is not None:
        extra(parser)
    if flat:
        parser.add_argument(
            "--address",
            default=None,
            help="Ray cluster address, e.g. ray://head:10001 or auto"
            + (f" ({address})" if address else "")
            + " (default: $RAY_ADDRESS, else a local Ray started in this process)",
        )
        add_verbose_argument(parser)
    return parser


def add_set_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """--set KEY=VALUE (repeatable), collected in `args.overrides`: one form in every command."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    """-v/--verbose: one meaning in every command."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=None,
        help="more output: flowray's DEBUG lines, and Ray's and MLflow's own INFO lines "
        "(default: off)",
    )


def config_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted key -> value of the config options given (None: not given)."""
    return {k[len(_DEST) :]: v for k, v in vars(args).items() if k.startswith(_DEST)}


def config_from_args(
    cls: type[T], args: argparse.Namespace, extra: Mapping[str, Any] | None = None
) -> T:
    """`cls` from --config, then --set, then the flags (and `extra` keys, after the flags)."""
    flags = {**config_flags(args), **(extra or {})}
    return load_config(cls, getattr(args, "config", None), getattr(args, "overrides", []), flags)


def setup_logging(verbose: bool | None, level: int = logging.INFO) -> None:
    """flowray's log lines from `level` up (DEBUG with -v); MLflow's own INFO lines only with -v."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    mlflow_level = "INFO" if verbose else "WARNING"
    # MLflow reads this when it is imported; a logger already set up is set here.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", mlflow_level)
    logging.getLogger("mlflow").setLevel(mlflow_level)
    logging.getLogger("alembic").setLevel(mlflow_level)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) or get_origin(tp) is dict


def _has_key(cls: type, key: str) -> bool:
    try:
        _field_of(cls, key)
    except KeyError:
        return False
    return True


def _field_of(cls: type, key: str) -> tuple[type, dataclasses.Field, Any]:
    """The dataclass that holds dotted `key`, the field, and its type."""
    *sections, name = key.split(".")
    owner = cls
    for section in sections:
        owner = get_type_hints(owner)[section]
        if not dataclasses.is_dataclass(owner):
            raise KeyError(key)
    fields = {f.name: f for f in dataclasses.fields(owner)}
    if name not in fields:
        raise KeyError(key)
    return owner, fields[name], get_type_hints(owner)[name]


def _default(item: dataclasses.Field) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return dataclasses.MISSING


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) or "none"
    return str(value).replace("%", "%%")


def _add_option(
    parser: argparse.ArgumentParser,
    cls: type,
    key: str,
    options: Sequence[str],
) -> None:
    owner, item, tp = _field_of(cls, key)
    docs = field_docs(owner)
    if item.name not in docs:
        raise TypeError(
            f"{owner.__name__}.{item.name}: expected an entry in the class docstring's "
            f"Attributes section (the help of {options[-1]}), found none"
        )
    text = docs[item.name].rstrip(".").replace("%", "%%")
    default = _default(item)
    if default is dataclasses.MISSING:
        text += " (required unless in --config)"
    kwargs: dict[str, Any] = {"dest": _DEST + key, "default": None}
    inner = _unwrap_optional(tp)
    if inner is bool:
        on = default is True
        if on:
            options = [f"--no-{o[2:]}" for o in options if o.startswith("--")]
        text += " (default: on; this flag turns it off)" if on else " (default: off)"
        parser.add_argument(*options, help=text, action="store_const", const=not on, **kwargs)
        return
    if default is not dataclasses.MISSING:
        text += f" (default: {_shown(default)})"
    origin = get_origin(inner)
    if origin is typing.Literal:
        choices = get_args(inner)
        kwargs.update(choices=choices, type=type(choices[0]))
    elif origin in (tuple, list):
        kwargs["nargs"] = "+"
        kwargs["type"] = _scalar(get_args(inner)[0] if get_args(inner) else str)
    else:
        kwargs["type"] = _scalar(inner)
    if "choices" not in kwargs:
        kwargs["metavar"] = _METAVARS.get(kwargs["type"]) or item.name.upper()
    parser.add_argument(*options, help=text, **kwargs)


def _unwrap_optional(tp: Any) -> Any:
    """`X | None` -> X; a union of several types -> str (from_dict tries each in turn)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        return options[0] if len(options) == 1 else str
    return tp


_METAVARS = {int: "N", float: "X"}


def _scalar(tp: Any) -> Any:
    if tp in (int, float, str):
        return tp
    if get_origin(tp) is typing.Literal:
        return type(get_args(tp)[0])
    raise TypeError(f"no command-line flag for a config field of type {tp}: use --set")
