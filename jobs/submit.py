"""`flowray submit`: run train, score, sample or prepare as a job on a Ray cluster, follow its logs
and exit with the job's own exit code (the parser's description says which).

    source .stack/env.sh                   # local stack: RAY_ADDRESS, MLFLOW_TRACKING_URI, AWS_*
    flowray submit train --config fashion-mnist --set data.train=s3://flowray/fmnist/train ...
    flowray submit --address http://head:8265 score --model models:/fashion-flow@champion \\
        --input s3://flowray/fmnist/test --output s3://flowray/scores
    flowray submit --no-wait sample --model models:/fashion-flow@champion -n 64 --output ...

Local paths in job arguments mean paths on the cluster, so use s3:// URLs. What travels with the
job is in pipeline/submission.py. Ctrl-C stops the job (a second Ctrl-C leaves it running).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from jobs.config import job_parser
from jobs.errors import EXIT_USAGE, run_main
from pipeline.storage import redact_url
from pipeline.submission import (
    JOB_COMMANDS,
    JobSpec,
    SubmitError,
    connect,
    dashboard_url,
    describe,
    final_message,
    follow,
    job_environment,
    job_exit_code,
    new_submission_id,
    repo_root,
    runtime_env,
    secret_values,
    stop,
    submit,
)

PROG = "flowray submit"
EXIT_INTERRUPTED = 130


def _key_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, found {text!r}")
    return name.strip(), value


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations (job_parser): a job's `--no-...` option must not pass for --no-wait.
    parser = job_parser(
        PROG,
        "Submit `python -m jobs.<job> [job args]` to a Ray cluster's job server with "
        "this checkout as working_dir and MLFLOW_TRACKING_URI, MLFLOW_S3_ENDPOINT_URL, "
        "AWS_ENDPOINT_URL, AWS_REGION/AWS_DEFAULT_REGION of this shell as the job's environment. "
        "Credentials are not forwarded unless --forward-credentials is given (the cluster's "
        "nodes use their own), and are never printed. Follows the job's logs and exits with the "
        "job's own exit code: 0 when it SUCCEEDED, the driver's exit code when it FAILED with "
        "one (3: finished with items left out), else 1 (also when it was STOPPED or the cluster "
        "could not be reached or refused it); 2 on a usage error (no or a malformed address, an "
        "unknown job). Options go before the job name; everything after it goes to the job.",
        epilog="Equivalent by hand: ray job submit --address $RAY_API_SERVER_ADDRESS "
        "--working-dir . --runtime-env-json '{\"env_vars\": {...}}' -- python -m jobs.<job> ...",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="the cluster: http(s)://<head>:8265 (job server) or <head>:6379 (GCS, looked up) "
        "(default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--working-dir",
        default=None,
        help="sources to ship as the job's working_dir (default: this flowray checkout)",
    )
    source.add_argument(
        "--no-working-dir",
        action="store_true",
        help="ship no sources: the cluster's image has flowray installed (default: off)",
    )
    parser.add_argument(
        "--env",
        action="append",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="one more environment variable for the job; repeatable (default: none)",
    )
    parser.add_argument(
        "--forward-credentials",
        action="store_true",
        help="forward this shell's AWS_* / MLFLOW_TRACKING_* credentials (and user:password@ in "
        "forwarded URLs) into the job's environment, where the Ray dashboard shows them to "
        "anyone who can read it (default: off: the cluster's nodes use their own identity)",
    )
    # Says the default out loud (no credentials forwarded); kept so scripts that pass it still run.
    parser.add_argument("--no-credentials", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--submission-id",
        default=None,
        help="job id (default: flowray-<job>-<time>-<random>)",
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="print the job id and return instead of following the logs (default: off)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be submitted (credentials masked) and exit; contacts no cluster "
        "(default: off)",
    )
    parser.add_argument("job", choices=JOB_COMMANDS, help="the job to run on the cluster")
    parser.add_argument(
        "job_args", nargs=argparse.REMAINDER, help="arguments of `python -m jobs.<job>`"
    )
    return parser


def build_spec(args: argparse.Namespace, environ: Mapping[str, str]) -> JobSpec:
    """The job described by parsed arguments and the submitting shell's environment."""
    job_args = list(args.job_args)
    if job_args[:1] == ["--"]:
        job_args = job_args[1:]
    if args.no_working_dir:
        working_dir = None
    elif args.working_dir:
        working_dir = Path(args.working_dir).resolve()
    else:
        working_dir = repo_root()
        if working_dir is None:
            raise SubmitError(
                "flowray is installed, not run from a checkout: there are no sources to ship",
                hint="pass --working-dir <flowray checkout>, or --no-working-dir when the "
                "cluster's image has flowray installed",
                exit_code=EXIT_USAGE,
            )
    if args.forward_credentials and args.no_credentials:
        raise SubmitError(
            "--forward-credentials and --no-credentials contradict each other",
            exit_code=EXIT_USAGE,
        )
    env = job_environment(environ, dict(args.env), credentials=args.forward_credentials)
    return JobSpec(
        command=args.job,
        args=job_args,
        runtime_env=runtime_env(working_dir, env),
        submission_id=args.submission_id or new_submission_id(args.job),
    )


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    spec = build_spec(args, environ)
    if args.dry_run:
        where = args.address or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS")
        print(describe(spec, where or "<no address>"))
        return 0
    url = dashboard_url(args.address, environ)
    print(describe(spec, url), file=sys.stderr, flush=True)
    shown = redact_url(url)
    client = connect(url)
    job_id = submit(client, spec)
    if args.no_wait:
        print(job_id)
        print(
            f"follow: ray job logs -f --address {shown} {job_id}\n"
            f"status: ray job status --address {shown} {job_id}\n"
            f"stop:   ray job stop --address {shown} {job_id}",
            file=sys.stderr,
        )
        return 0
    print(
        f"job {job_id} submitted; following its logs (Ctrl-C stops it)", file=sys.stderr, flush=True
    )
    # This shell's credentials are masked in the job's output even when not forwarded: the
    # cluster may hold the same ones.
    own = job_environment(environ, dict(args.env), credentials=True)
    masked = secret_values({**own, **spec.runtime_env.get("env_vars", {})})
    started = time.monotonic()
    try:
        status = follow(client, job_id, sys.stdout, secrets=masked)
    except KeyboardInterrupt:
        print(f"\nstopping job {job_id} (Ctrl-C again to leave it running)", file=sys.stderr)
        try:
            status = stop(client, job_id)
        except KeyboardInterrupt:
            print(f"job {job_id} left running", file=sys.stderr)
            return EXIT_INTERRUPTED
    reason = "" if status == "SUCCEEDED" else final_message(client, job_id, masked)
    print(
        f"job {job_id}: {status} after {time.monotonic() - started:.0f} s"
        + (f": {reason}" if reason else ""),
        flush=True,
    )
    return job_exit_code(client, job_id, status)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Ray logs each .gitignore it honours and each default exclude while it packs working_dir:
    # keep its upload line, drop that chatter.
    for name in ("ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return run_main(PROG, lambda: run(args, os.environ))


if __name__ == "__main__":
    sys.exit(main())
