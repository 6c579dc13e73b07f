"""`flowray <command>`: one console script over the job modules (each also runs as `python -m jobs.<name>`)."""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help). Modules are imported only when their command runs, so
# `flowray --help` stays fast and a broken optional dependency only breaks its own command.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": (
        "jobs.prepare",
        "write WebDataset image shards + manifest from IDX, image folders or .npy",
    ),
    "train": ("jobs.train", "train a flow with Ray Train; log and register it in MLflow"),
    "score": ("jobs.score", "bulk log-likelihood scoring of image shards with a registered model"),
    "sample": ("jobs.sample", "generate images from a registered model with Ray tasks"),
    "serve": (
        "jobs.serve",
        "online scoring over HTTP on Ray Serve, reloading when the alias moves",
    ),
    "models": ("jobs.models", "list registered models, versions and aliases; promote a version"),
    "scores": ("jobs.scores", "query scoring outputs: the least likely or most OOD images"),
    "submit": (
        "jobs.submit",
        "submit train|score|sample|prepare to a Ray cluster; exits with the job's exit code",
    ),
    "demo": (
        "jobs.demo",
        "the whole pipeline on the embedded default (local Ray, disk, SQLite MLflow)",
    ),
    "bench": ("jobs.bench", "benchmarks side by side: quality, throughput, memory"),
}

# The same numbers as jobs.errors (not imported here: it imports torch, and --help stays light).
EXIT_CODES = (
    (0, "done"),
    (1, "runtime failure: a service down or refusing, data broken mid-run, a bug"),
    (2, "usage or configuration error: nothing was done"),
    (3, "finished with items left out (each reported)"),
    (4, "refused by a rule, nothing changed (models promote of a version that is not better)"),
    (5, "drift at the level asked to fail at (score --fail-on-drift, scores drift --fail-on)"),
)
USAGE_ERROR = 2
# The same as pipeline.tracking.connection.DEFAULT_WORKDIR (not imported: --help stays light).
DEFAULT_WORKDIR = "flowray-work"


def usage() -> str:
    lines = ["usage: flowray <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    lines += [
        "",
        "`flowray <command> --help` or `flowray help <command>` lists a command's options and "
        "defaults;",
        "`flowray --version` prints the version.",
        "",
        "Every job takes --config <file or preset>, then --set key=value, then its own flags",
        "(a later one wins); -v/--verbose means more output in every command.",
        "The work folder (prepared data, runs, the MLflow store sqlite:///<workdir>/mlflow.db)",
        f"is $FLOWRAY_WORKDIR, else ./{DEFAULT_WORKDIR}: the same for every command and `make demo`.",
        "",
        "exit codes:",
    ]
    lines += [f"  {code}  {text}" for code, text in EXIT_CODES]
    return "\n".join(lines)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("flowray")
    except PackageNotFoundError:  # a checkout run without installing it
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--version"], ["-V"]):
        print(f"flowray {version()}")
        return 0
    if not argv:  # a command is required, as for `flowray models` without a subcommand
        print(usage(), file=sys.stderr)
        return USAGE_ERROR
    if argv[0] in ("-h", "--help") or argv == ["help"]:
        print(usage())
        return 0
    if argv[0] == "help":
        return command_help(argv[1])
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"flowray: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return USAGE_ERROR
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


def command_help(name: str) -> int:
    """`flowray help <command>`: that command's --help."""
    if name not in COMMANDS:
        print(f"flowray help: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return USAGE_ERROR
    try:
        return int(importlib.import_module(COMMANDS[name][0]).main(["--help"]) or 0)
    except SystemExit as done:  # argparse exits after printing the help
        return int(done.code or 0)


if __name__ == "__main__":
    sys.exit(main())
