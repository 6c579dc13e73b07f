"""`flowray`: the command list answers fast, without importing torch, Ray or MLflow."""

from __future__ import annotations

import subprocess
import sys

from jobs.cli import COMMANDS

CHECK_HELP = """
import sys
from jobs import cli
cli.main(["--help"])
heavy = sorted({"torch", "ray", "mlflow"} & set(sys.modules))
print("heavy:", ",".join(heavy) or "none")
"""


def test_help_lists_every_command_and_imports_nothing_heavy() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHECK_HELP], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for name in COMMANDS:
        assert f"\n  {name} " in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "heavy: none"
