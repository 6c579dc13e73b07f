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
    "models": ("jobs.models", "list registered models, versions and aliases; promote a version"),
    "submit": ("jobs.submit", "submit train|score|sample to a Ray cluster and follow its logs"),
    "demo": (
        "jobs.demo",
        "the whole pipeline on the embedded default (local Ray, disk, SQLite MLflow)",
    ),
    "bench": ("jobs.bench", "benchmarks side by side: quality, throughput, memory"),
}


def usage() -> str:
    lines = ["usage: flowray <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`flowray <command> --help` lists each command's options and defaults."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from jobs.errors import EXIT_USAGE  # here, not at the top: it imports torch (via flowmodel)

        print(f"flowray: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_USAGE
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
