"""`flowray`: the command list answers fast, without importing torch, Ray or MLflow; every command
speaks one style (--address, one `(default: ...)` per option, `flowray help <command>`,
`--version`), and the exit codes are documented where users look."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from jobs import cli
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


def test_help_documents_the_exit_codes_jobs_use(capsys: pytest.CaptureFixture) -> None:
    from jobs.errors import EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE

    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "exit codes:" in text
    for code, words in [
        (EXIT_OK, "done"),
        (EXIT_FAILURE, "runtime failure"),
        (EXIT_USAGE, "usage or configuration error"),
        (EXIT_PARTIAL, "finished with items left out"),
    ]:
        assert re.search(rf"^  {code}  {words}", text, re.MULTILINE), (code, words)


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"flowray {version('flowray')}\n"


def test_help_of_a_command_is_that_commands_help(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["help", "train"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: flowray train")
    assert "--print-config" in text
    assert cli.main(["help", "trian"]) == 2
    assert "flowray help: unknown command 'trian'" in capsys.readouterr().err


def option_entries(help_text: str) -> dict[str, str]:
    """Each option of a --help text (its first flag) -> its whole entry, lines joined."""
    entries: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        match = re.match(r"^  (-[-\w]+)", line)
        if match:
            current = match[1]
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


HELP_ARGS = [[name] for name in COMMANDS] + [["models", "list"], ["models", "promote"]]


@pytest.mark.parametrize("command", HELP_ARGS, ids=" ".join)
def test_every_option_shows_its_default_at_most_once(
    command: list[str], capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main([*command, "--help"])
    assert done.value.code == 0
    entries = option_entries(capsys.readouterr().out)
    assert entries, "no options found in the help"
    for option, entry in entries.items():
        assert entry.count("(default:") <= 1, entry
        if option not in ("-h",):
            assert "(default: None)" not in entry, entry
            if command[0] != "bench":
                assert "(default:" in entry or "(required" in entry, entry
    if "--address" in entries or command[0] in ("train", "score", "sample", "serve", "prepare"):
        assert "--address" in entries, "every command that reaches Ray says --address"
        assert "--ray-address" not in entries


def test_train_shows_each_default_once(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.count("(default: fashion-mnist)") == 1


def test_train_verbose_flag_turns_on_ray_trains_report_lines(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["train", "--print-config"]) == 0
    assert "\nverbose: false\n" in capsys.readouterr().out
    assert cli.main(["train", "--print-config", "-v"]) == 0
    assert "\nverbose: true\n" in capsys.readouterr().out


def test_train_takes_the_storage_flags_every_job_takes(capsys: pytest.CaptureFixture) -> None:
    argv = ["train", "--print-config", "--endpoint-url", "http://s3:9000", "--region", "eu-north-1"]
    assert cli.main(argv) == 0
    storage = yaml.safe_load(capsys.readouterr().out)["storage"]
    assert (storage["endpoint_url"], storage["region"]) == ("http://s3:9000", "eu-north-1")


def test_test_hooks_are_not_config_keys(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["train", "--print-config"]) == 0
    printed = capsys.readouterr().out
    for hook in ("fail_at_step", "hold_at_step", "record_batches"):
        assert hook not in printed
    assert cli.main(["train", "--print-config", "--set", "hold_at_step=3"]) == 2
    assert "unknown key hold_at_step" in capsys.readouterr().err


# Each shared option: the commands that take it, and the commands that must not take it under
# another name. One name and one meaning everywhere.
SHARED_OPTIONS = {
    "--output": ["score", "sample", "prepare"],
    "--endpoint-url": ["train", "score", "sample", "prepare"],
    "--region": ["train", "score", "sample", "prepare"],
    "--address": ["train", "score", "sample", "serve", "prepare"],
    "--tracking-uri": ["train", "score", "sample", "serve"],
    "--verbose": ["train", "score", "sample", "serve", "prepare", "demo"],
    "--config": ["train", "score", "sample", "serve", "prepare"],
    "--set": ["train", "score", "sample", "serve", "prepare", "demo"],
}


def flags_of(command: list[str], capsys: pytest.CaptureFixture) -> set[str]:
    """Every option string (`-v`, `--verbose`, ...) that `flowray <command> --help` lists."""
    with pytest.raises(SystemExit) as done:
        cli.main([*command, "--help"])
    assert done.value.code == 0
    flags: set[str] = set()
    for entry in option_entries(capsys.readouterr().out).values():
        names = re.split(r"\s{2,}", entry.strip())[0]
        flags |= {part.split()[0] for part in names.split(", ")}
    return flags


@pytest.mark.parametrize("option", sorted(SHARED_OPTIONS))
def test_a_shared_option_has_one_name_in_every_command(
    option: str, capsys: pytest.CaptureFixture
) -> None:
    missing = [c for c in SHARED_OPTIONS[option] if option not in flags_of([c], capsys)]
    assert missing == []


@pytest.mark.parametrize("command", ["score", "sample", "serve", "prepare", "scores top", "demo"])
def test_retired_spellings_are_gone(command: str, capsys: pytest.CaptureFixture) -> None:
    flags = flags_of(command.split(), capsys)
    assert not {"--out", "--n", "--ray-address", "--reload-interval", "--samples"} & flags
    if command == "prepare":
        assert "--workers" not in flags and "--tasks" in flags  # --workers: Ray Train workers


def test_the_number_of_images_is_n_or_num(capsys: pytest.CaptureFixture) -> None:
    for command in (["sample"], ["scores", "top"], ["demo"]):
        assert {"-n", "--num"} <= flags_of(command, capsys), command


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        ([], 2),  # no command: a usage error, as a group command without its subcommand
        (["models"], 2),
        (["scores"], 2),
        (["--help"], 0),
        (["help"], 0),
        (["nope"], 2),
    ],
)
def test_exit_codes_of_the_command_groups(
    argv: list[str], code: int, capsys: pytest.CaptureFixture
) -> None:
    assert cli.main(argv) == code
    captured = capsys.readouterr()
    if code == 2:
        assert "usage:" in captured.err and captured.out == ""


def test_the_default_work_folder_is_named_once() -> None:
    from pipeline.tracking.connection import DEFAULT_WORKDIR

    assert cli.DEFAULT_WORKDIR == DEFAULT_WORKDIR


@pytest.mark.parametrize(
    ("command", "option"),
    [
        (["sample", "--gpus-per-task", "1", "-n", "8"], "--gpus-per-task"),
        (["score", "--gpus-per-actor", "1", "--input", "unused"], "--gpus-per-actor"),
    ],
)
def test_a_gpu_job_without_a_gpu_fails_at_once_with_the_fix(
    command: list[str],
    option: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    # Without the check, a local Ray with no GPU left the job's tasks or actors waiting for ever.
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the local Ray would use it")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = [*command, "--model", str(tmp_path), "--output", str(tmp_path / "out")]
    args += ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"{option} 1: expected a CUDA GPU for a local Ray, found 0 on this machine" in err
    assert f"leave out {option} to run on CPUs" in err
