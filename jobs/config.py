"""The command-line side of job configuration: the `--config` / `--set` pair every job takes and
the help style of every command. The loader itself is `pipeline.config`.
"""

from __future__ import annotations

import argparse

from pipeline.config import ConfigError, apply_overrides, load_config, preset_path

__all__ = [
    "ConfigError",
    "HelpFormatter",
    "add_config_arguments",
    "apply_overrides",
    "load_config",
    "preset_path",
]


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    """The --config / --set pair every job takes."""
    parser.add_argument(
        "--config",
        default=default_config,
        help="YAML config file or preset name from jobs/configs "
        f"(default: {default_config or 'none: options and --set only'})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set optim.lr=3e-4 (repeatable)",
    )


class HelpFormatter(argparse.HelpFormatter):
    """The help style of every command: each option ends with exactly one `(default: ...)`.

    A help text that already says its default (defaults read from a job's config dataclass, or
    described in words: "(default: $RAY_ADDRESS, else a local Ray)") is left alone; otherwise the
    option's argparse default is added: on/off for flags, "none" for an empty list, nothing for
    None (such an option says in its text what happens without it).
    """

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
