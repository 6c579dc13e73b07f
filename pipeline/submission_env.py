"""What a submitted job takes from the submitting shell, and how credentials are kept out of
sight: which variables travel (`job_environment`), which values are secrets (`is_secret`,
`secret_values`), and how they are masked in what is printed (`redacted`, `mask`,
`credentials_line`). `pipeline.submission` re-exports all of it; see its docstring for the policy
(no credential is forwarded unless asked).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from pipeline.storage import redact_url

__all__ = [
    "CREDENTIAL_VARIABLES",
    "FORWARDED_VARIABLES",
    "MASK",
    "credentials_line",
    "is_secret",
    "job_environment",
    "mask",
    "redacted",
    "secret_values",
]

# Where the job finds the tracking server and object storage: copied from the submitting shell.
FORWARDED_VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)
# Copied too only with credentials=True; never printed.
CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
# Variable names whose values are secrets, besides CREDENTIAL_VARIABLES (for --env KEY=VALUE).
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY")
# user:password@ in a URL (a tracking URI with basic auth, say).
_URL_PASSWORD = re.compile(r"(?<=://)([^:/@\s]+):([^@/\s]+)@")
MASK = "***"


def job_environment(
    environ: Mapping[str, str],
    extra: Mapping[str, str] | None = None,
    credentials: bool = False,
) -> dict[str, str]:
    """The env_vars a job gets: FORWARDED_VARIABLES (and CREDENTIAL_VARIABLES when `credentials`)
    that are set in `environ`, then `extra`. Without `credentials`, forwarded URLs lose their
    `user:password@`. A region set under one of AWS_REGION / AWS_DEFAULT_REGION is set under
    both (boto3 reads one, other AWS SDKs the other)."""
    names = FORWARDED_VARIABLES + (CREDENTIAL_VARIABLES if credentials else ())
    env = {name: environ[name] for name in names if environ.get(name)}
    if not credentials:
        env = {name: redact_url(value) for name, value in env.items()}
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        env.setdefault("AWS_REGION", region)
        env.setdefault("AWS_DEFAULT_REGION", region)
    env.update(extra or {})
    return env


def is_secret(name: str) -> bool:
    return name in CREDENTIAL_VARIABLES or bool(_SECRET_NAME.search(name.upper()))


def secret_values(env: Mapping[str, str]) -> list[str]:
    """Values to mask wherever they appear: secret variables' values and passwords in URLs.
    Values shorter than 4 characters are not masked (they would mask half the log)."""
    values = {value for name, value in env.items() if is_secret(name)}
    values |= {match.group(2) for value in env.values() for match in _URL_PASSWORD.finditer(value)}
    return sorted((v for v in values if len(v) >= 4), key=len, reverse=True)


def redacted(env: Mapping[str, str]) -> dict[str, str]:
    """env for printing: secret variables' values replaced by ***, `user:password@` stripped
    from URLs."""
    return {name: MASK if is_secret(name) else redact_url(value) for name, value in env.items()}


def mask(text: str, secrets_: Sequence[str]) -> str:
    """text with `user:password@` stripped from URLs and each of `secrets_` (longest first, as
    secret_values orders them) replaced by ***."""
    text = redact_url(text)
    for value in secrets_:
        text = text.replace(value, MASK)
    return text


def credentials_line(env_vars: Mapping[str, str]) -> str:
    """What `describe` says about credentials: which were forwarded, or that none were."""
    forwarded = sorted(name for name in env_vars if is_secret(name))
    userinfo = sorted(name for name, value in env_vars.items() if _URL_PASSWORD.search(value))
    if not forwarded and not userinfo:
        return (
            "  credentials: none forwarded (the cluster's nodes use their own; "
            "--forward-credentials sends this shell's AWS_*/MLFLOW_TRACKING_* credentials, "
            "which the Ray dashboard then shows)"
        )
    return (
        f"  credentials: forwarded {', '.join(forwarded + userinfo)} (values masked here; the "
        "Ray dashboard shows them to anyone who can read it)"
    )
