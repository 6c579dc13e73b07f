"""`flowray bench <suite>`: benchmarks side by side; each suite prints its tables and writes
<output>/<suite>.json and <output>/<suite>.md.

    flowray bench all --smoke                           # every suite in seconds (the tests run this)
    flowray bench all                                   # every suite, full size (about an hour on 2 cores)
    flowray bench quality --set minutes=10              # flowray vs normflows test bits/dim
    flowray bench training --set repeats=3 --set seconds=60
    flowray bench ablation --set minutes=10 --set parallel=7 --set threads=2

The suites are `pipeline.bench.SUITES`; a suite's settings (what `--set key=value` changes, with
their defaults) are its `Settings` dataclass, listed by `flowray bench <suite> --list-settings`.
With several suites, a key applies to every selected suite that has it. Only ratios and
side-by-side figures from one run mean anything on a shared machine; every report carries the
machine and its load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from flowmodel.typed import to_dict
from jobs.config import add_set_argument, add_verbose_argument, job_parser
from pipeline.bench import SUITES
from pipeline.bench.harness import suite_settings
from pipeline.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    choices = [*SUITES, "all"]
    about = "; ".join(f"{name}: {suite.about}" for name, suite in SUITES.items())
    left_out = ", ".join(name for name, suite in SUITES.items() if not suite.in_all)
    parser = job_parser(
        "flowray bench",
        f"Benchmarks side by side. Suites: {about}. `all` runs every suite but {left_out}.",
    )
    parser.add_argument("suite", nargs="?", choices=choices, help="the suite to run (default: all)")
    parser.add_argument("--suite", dest="suite_option", choices=choices, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="seconds-long sizes of each suite")
    add_set_argument(
        parser, "a suite setting, e.g. --set minutes=10 (repeatable; see --list-settings)"
    )
    parser.add_argument(
        "--config",
        help="training preset or YAML for the suites that train or build the preset model "
        "(default: each suite's own, fashion-mnist; gpu: rgb32)",
    )
    parser.add_argument("--output", default="bench-results", help="folder for the JSON and .md")
    parser.add_argument("--out", dest="output", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--workdir", help="shards, models and stores kept between runs (default: <output>/work)"
    )
    parser.add_argument(
        "--list-settings", action="store_true", help="print each suite's settings and exit"
    )
    add_verbose_argument(parser)
    return parser


def _module(name: str) -> Any:
    return importlib.import_module(f"pipeline.bench.{SUITES[name].module}")


def settings_for(name: str, smoke: bool, overrides: list[str]) -> Any:
    """A suite's typed settings: its defaults, then SMOKE's sizes, then the overrides."""
    module = _module(name)
    return suite_settings(module.Settings, module.SMOKE if smoke else {}, overrides)


def _resolve(
    parser: argparse.ArgumentParser, suites: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Each suite's settings; an override no selected suite knows is a usage error. --config
    names the preset of every selected suite that builds one."""
    overrides = list(args.overrides)
    fields = {name: {f.name for f in dataclasses.fields(_module(name).Settings)} for name in suites}
    unknown = [o for o in overrides if not any(o.split("=")[0] in f for f in fields.values())]
    if unknown:
        known = sorted(set().union(*fields.values()))
        parser.error(f"--set {unknown[0]}: no selected suite has it (settings: {', '.join(known)})")
    resolved = {}
    for name in suites:
        mine = [o for o in overrides if o.split("=")[0] in fields[name]]
        if args.config and "preset" in fields[name]:
            mine.insert(0, f"preset={args.config}")
        try:
            resolved[name] = settings_for(name, args.smoke, mine)
        except ConfigError as err:
            parser.error(f"{name}: {err}")
    return resolved


def _finite_json(value: Any) -> Any:
    """NaN and inf as null (strict JSON); numpy and torch scalars as numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    if hasattr(value, "item"):
        return _finite_json(value.item())
    return value


def _run(suite: str, settings: Any, output: Path, workdir: Path) -> dict[str, Any]:
    """One suite measured, its report written to <output>/<suite>.json and .md."""
    from pipeline.bench.harness import Run, machine

    info = machine()
    started = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    result = _module(suite).measure(settings, Run(workdir.resolve(), output.resolve()))
    report = {
        "suite": suite,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": info,
        "inputs": dataclasses.asdict(settings),
        **result.report(),
        "seconds": time.perf_counter() - started,
    }
    report["markdown"] += (
        f"\n\nMachine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, Ray "
        f"{info['ray']}, load average at start {info['load_average'][0]}."
    )
    output.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite_json(report), indent=2, default=str)
    (output / f"{suite}.json").write_text(text + "\n")
    (output / f"{suite}.md").write_text(f"## {suite}\n\n{report['markdown']}\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.suite and args.suite_option and args.suite != args.suite_option:
        parser.error(f"two suites given: {args.suite} and --suite {args.suite_option}")
    chosen = args.suite or args.suite_option or "all"
    suites = [n for n, s in SUITES.items() if s.in_all] if chosen == "all" else [chosen]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.list_settings:
        for name in suites:
            module = _module(name)
            settings = ", ".join(f"{k}={v}" for k, v in to_dict(module.Settings()).items())
            print(f"{name}: {settings}\n  --smoke: {module.SMOKE}")
        return 0
    resolved = _resolve(parser, suites, args)
    # Progress must reach a log file (nohup ... > log) as it happens, not at exit.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    # normflows calls torch.lu, deprecated in torch 2.x: one warning per step otherwise.
    warnings.filterwarnings("ignore", message=r"torch\.lu is deprecated")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"normflows")
    output = Path(args.output)
    workdir = Path(args.workdir) if args.workdir else output / "work"
    failed = []
    for suite, settings in resolved.items():
        print(f"\n## {suite}\n", flush=True)
        try:
            folder = workdir / (f"{suite}-smoke" if args.smoke else suite)
            report = _run(suite, settings, output, folder)
        except Exception as err:  # one suite failing should not lose the others' results
            failed.append(suite)
            logging.getLogger("flowray.bench").debug("%s failed", suite, exc_info=True)
            print(f"{suite}: failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            continue
        print(report["markdown"], flush=True)
        print(f"\n({suite}: {report['seconds']:.0f} s; {output / suite}.json)", flush=True)
    if failed:
        print(f"failed suites: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
