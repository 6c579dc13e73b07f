"""`flowray models`: list registered models with validation bits/dim and aliases; promote a version;
calibrate a version.

    flowray models list [--name fashion-flow]
    flowray models promote fashion-flow 7 [--alias champion] [--force]
    flowray models calibrate fashion-flow 7 --data flowray-work/data/test

`calibrate` scores (the first --images of) a version's validation split with the version's flow
and stores what "normal" is for it (pipeline.model.calibration, pipeline.tracking.registry), as
training does at registration: older versions get the flags and drift verdicts of `flowray score`.

`promote` refuses (exit code 4, EXIT_REFUSED) a version whose validation bits/dim is not better
than the alias's current holder, unless --force. Without a subcommand: the help, exit code 2.
"""

from __future__ import annotations

import argparse
import math
import sys

from jobs._batch import check_tracking_server
from jobs.config import add_subcommands, add_verbose_argument, job_parser, setup_logging
from jobs.errors import EXIT_FAILURE, EXIT_REFUSED, EXIT_USAGE, UserError, run_main
from pipeline.storage import redact_url

PROG = "flowray models"


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
        "sqlite:///<workdir>/mlflow.db, workdir $FLOWRAY_WORKDIR or flowray-work)",
    )
    add_verbose_argument(parser)


def parser() -> argparse.ArgumentParser:
    p = job_parser(PROG, "Registered flows: list versions and aliases, promote a version.")
    commands = add_subcommands(p, "list", "promote", "calibrate")
    listing = commands.add_parser("list", help="registered models, versions, val bits/dim, aliases")
    listing.add_argument("--name", default=None, help="only this model (default: all)")
    _add_common(listing)
    promote = commands.add_parser(
        "promote",
        help="point an alias at a version if its val bits/dim is better",
    )
    promote.add_argument("name", help="registered model name")
    promote.add_argument("version", help="version number to promote")
    promote.add_argument("--alias", default="champion", help="alias to move (default: champion)")
    promote.add_argument(
        "--force",
        action="store_true",
        help="promote even if worse than the alias's current version (default: off)",
    )
    _add_common(promote)
    calibrate = commands.add_parser(
        "calibrate",
        help="score a version's validation split and store its calibration with the version",
    )
    calibrate.add_argument("name", help="registered model name")
    calibrate.add_argument("version", help="version number to calibrate")
    calibrate.add_argument(
        "--data",
        required=True,
        help="the validation split: a prepared split or WebDataset shards (required)",
    )
    calibrate.add_argument("--images", type=int, default=10_000, help="score at most this many")
    calibrate.add_argument("--seed", type=int, default=0, help="dequantization seed")
    calibrate.add_argument("--draws", type=int, default=1, help="dequantization draws per image")
    calibrate.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint")
    calibrate.add_argument("--region", default=None, help="S3 region")
    _add_common(calibrate)
    return p


def calibrate(args: argparse.Namespace) -> str:
    """Calibrate NAME VERSION on --data and store it; the line the command prints."""
    from pipeline.data.reader import iter_input
    from pipeline.data.tally import SkipTally
    from pipeline.model.calibration import calibrate_flow
    from pipeline.storage import StorageConfig
    from pipeline.tracking.registry import resolve_model, store_calibration

    flow = resolve_model(f"models:/{args.name}/{args.version}").flow
    storage = StorageConfig(endpoint_url=args.endpoint_url, region=args.region)
    rows = iter_input(
        args.data,
        storage,
        shape=tuple(flow.config.image_shape),
        on_error="skip",
        tally=SkipTally(),
    )
    data = redact_url(args.data)
    try:
        found = calibrate_flow(
            flow, rows, args.seed, args.draws, args.images, source={"data": data}
        )
    except ValueError as err:
        raise UserError(f"cannot calibrate on {data}: {err}") from None
    uri = store_calibration(args.name, args.version, found)
    return (
        f"{args.name} v{args.version}: calibrated on {found.count:,} images of {data}: flag "
        f"threshold {found.threshold():.4f} (ood_score q{found.quantile:g}), bits/dim mean "
        f"{found.bits_mean:.4f} -> {uri}"
    )


def format_models(models: list, tracking_uri: str) -> str:
    """The `list` table: one block per model, one row per version, newest first."""
    if not models:
        return f"no registered models at {redact_url(tracking_uri)}"
    lines = []
    for model in models:
        aliases = ", ".join(f"@{a} -> v{v}" for a, v in model.aliases.items()) or "none"
        lines.append(f"{model.name}  (aliases: {aliases})")
        lines.append(
            f"  {'version':>7}  {'val bits/dim':>12}  {'aliases':<20}  {'created':<25}  run"
        )
        for v in model.versions:
            bpd = "-" if math.isnan(v.val_bits_per_dim) else f"{v.val_bits_per_dim:.4f}"
            names = ", ".join(v.aliases) or "-"
            lines.append(f"  {v.version:>7}  {bpd:>12}  {names:<20}  {v.created:<25}  {v.run_id}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help(sys.stderr)
        return EXIT_USAGE
    setup_logging(args.verbose)

    def body() -> int:
        import mlflow
        from mlflow.exceptions import MlflowException

        from pipeline.tracking.registry import list_models, promote

        uri = check_tracking_server(args.tracking_uri)
        mlflow.set_tracking_uri(uri)
        if args.command == "list":
            print(format_models(list_models(args.name), uri))
            return 0
        if args.command == "calibrate":
            print(calibrate(args))
            return 0
        model = list_models(args.name)[0]  # ModelNotFound names what is registered
        if args.version not in {v.version for v in model.versions}:
            known = ", ".join(v.version for v in model.versions) or "none"
            raise UserError(
                f"{args.name} has no version {args.version} (versions: {known})",
                hint="see `flowray models list`",
            )
        try:
            decision = promote(args.name, args.version, force=args.force, alias=args.alias)
        except MlflowException as err:
            raise UserError(
                f"promotion failed: {err.message.splitlines()[0]}", exit_code=EXIT_FAILURE
            ) from err
        if decision.promoted:
            print(f"{args.name} v{args.version}: {decision.reason}")
            return 0
        print(
            f"refused: {args.name} v{args.version} is not better: {decision.reason}; "
            "pass --force to promote it anyway",
            file=sys.stderr,
        )
        return EXIT_REFUSED

    return run_main(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
