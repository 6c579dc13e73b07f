"""The documentation runs as printed: every command in README.md and docs/*.md parses with the
CLI it names, and the README's Python API example runs.

Commands come from fenced ```bash, ```sh and ```console blocks (console: the `$ ` lines only).
Continuation lines are joined; shell variables become a placeholder word and nothing else is
substituted; each simple command of a line (split at `&&`, `||`, `;`, `|`, `&`, leading
`VAR=value` assignments dropped) is checked when it is one of ours:

    flowray <command> ...        that command's parser must accept it (parse_args must not exit)
    python -m jobs.<name> ...    the same, for the module's parser
    make <target> ...            every target must be one the Makefile defines

`flowray submit <job> <args>` checks the job's arguments with the job's own parser too, and
`--set key=value` overrides of `flowray train` and `flowray demo` must name TrainConfig keys.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from jobs.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
SHELL_VARIABLE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}|\$[A-Za-z_][A-Za-z0-9_]*")
OPERATORS = {"&&", "||", ";", "|", "&", ";;"}
PYTHONS = {"python", "python3", ".venv/bin/python"}
FLOWRAYS = {"flowray", ".venv/bin/flowray"}


@dataclass(frozen=True)
class Command:
    """One simple command of a documented block: where it is and its words."""

    where: str  # file:line
    words: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.words)}"


def shell_blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line of the block's first line, language, text) of each fenced block in `path`."""
    text = path.read_text()
    return [
        (text.count("\n", 0, match.start(2)) + 1, match.group(1), match.group(2))
        for match in FENCE.finditer(text)
    ]


def command_lines(language: str, text: str, first_line: int) -> list[tuple[int, str]]:
    """(line number, command line) of a shell block, continuation lines joined; console blocks
    keep only their `$ ` lines."""
    lines: list[tuple[int, str]] = []
    pending, start = "", 0
    for offset, raw in enumerate(text.splitlines()):
        line = raw
        if language == "console" and not pending:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if not pending:
            start = first_line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        if not quotes_closed(pending + line):  # a quoted string goes on to the next line
            pending += line + "\n"
            continue
        lines.append((start, pending + line))
        pending = ""
    if pending:
        lines.append((start, pending))
    return lines


def quotes_closed(line: str) -> bool:
    try:
        shlex.split(line, comments=True)
    except ValueError:  # "No closing quotation"
        return False
    return True


def simple_commands(line: str) -> list[list[str]]:
    """The words of each simple command of a shell line, shell variables as `VAR`."""
    lexer = shlex.shlex(SHELL_VARIABLE.sub("VAR", line), posix=True, punctuation_chars="&|;")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    for word in lexer:
        if word in OPERATORS:
            commands.append([])
        else:
            commands[-1].append(word)
    for words in commands:  # FOO=bar flowray ...: the assignments are the shell's
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            words.pop(0)
    return [words for words in commands if words]


def documented_commands() -> list[Command]:
    """Every simple command in the shell blocks of README.md and docs/*.md."""
    found: list[Command] = []
    for path in DOCS:
        for first_line, language, text in shell_blocks(path):
            if language not in ("bash", "sh", "console"):
                continue
            for number, line in command_lines(language, text, first_line):
                for words in simple_commands(line):
                    where = f"{path.relative_to(ROOT)}:{number}"
                    found.append(Command(where, tuple(words)))
    return found


def job_words(words: tuple[str, ...]) -> tuple[str, ...]:
    """The words from `python -m jobs.<name>` on, where a command runs one: alone, or after the
    `--` of `ray job submit`."""
    if words[:2] == ("ray", "job") and "--" in words:
        words = words[words.index("--") + 1 :]
    is_job = words[:2] in ((p, "-m") for p in PYTHONS) and words[2:3] != ()
    return words if is_job and words[2].startswith("jobs.") else ()


def ours(command: Command) -> bool:
    words = command.words
    return words[0] in FLOWRAYS or words[0] == "make" or bool(job_words(words))


def job_module(name: str) -> ModuleType:
    return importlib.import_module(name)


def parser_of(module: ModuleType) -> argparse.ArgumentParser:
    """The module's argument parser (`parser()`, else `build_parser()`), taking options by their
    full names only: the docs spell every option out, so a renamed option fails here even where
    argparse would accept the old name as a prefix of the new one."""
    factory = getattr(module, "parser", None) or getattr(module, "build_parser", None)
    assert callable(factory), f"{module.__name__}: expected a parser() function, found none"
    parser = factory()
    no_abbreviations(parser)
    return parser


def no_abbreviations(parser: argparse.ArgumentParser) -> None:
    parser.allow_abbrev = False
    for action in parser._actions:  # subcommands: `models list`, `scores top`
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                no_abbreviations(sub)


def parse(module: ModuleType, argv: list[str], command: Command) -> argparse.Namespace | None:
    """argv parsed by the module's parser; a usage error fails the test with argparse's message.
    `--help` only checks that the command exists."""
    if "-h" in argv or "--help" in argv:
        return None
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parser_of(module).parse_args(argv)
    except SystemExit as stop:
        pytest.fail(f"{command}\n  exits {stop.code}: {errors.getvalue().strip()}")


def check_train_overrides(args: argparse.Namespace | None, command: Command) -> None:
    """`--set key=value` of train and demo must name keys of TrainConfig."""
    overrides = getattr(args, "overrides", None) if args is not None else None
    if not overrides:
        return
    from pipeline.config import load_config
    from pipeline.train.config import TrainConfig

    preset = getattr(args, "config", None) or "fashion-mnist"
    try:
        load_config(TrainConfig, preset, list(overrides))
    except Exception as error:  # ConfigError, or the dataclass's own validation
        pytest.fail(f"{command}\n  --set refused: {error}")


def check_bench_settings(
    module: ModuleType, args: argparse.Namespace | None, command: Command
) -> None:
    """`flowray bench <suite> --set key=value` must name settings of that suite."""
    overrides = getattr(args, "overrides", None) if args is not None else None
    suite = getattr(args, "suite", None) if args is not None else None
    if not overrides or suite in (None, "all"):
        return
    try:
        module.settings_for(suite, bool(getattr(args, "smoke", False)), list(overrides))
    except Exception as error:  # ConfigError: an unknown setting or a wrong type
        pytest.fail(f"{command}\n  --set refused by the {suite} suite: {error}")


def check_flowray(argv: list[str], command: Command) -> None:
    if not argv or argv[0] in ("-h", "--help", "-V", "--version"):
        return
    if argv[0] == "help":
        assert argv[1] in COMMANDS, f"{command}: no such command {argv[1]!r}"
        return
    name, rest = argv[0], argv[1:]
    assert name in COMMANDS, (
        f"{command}: no such command {name!r} (commands: {', '.join(COMMANDS)})"
    )
    check_job(COMMANDS[name][0], rest, command)


def check_job(module_name: str, argv: list[str], command: Command) -> None:
    module = job_module(module_name)
    args = parse(module, argv, command)
    job = module_name.rsplit(".", 1)[-1]
    if job in ("train", "demo"):
        check_train_overrides(args, command)
    if job == "bench":
        check_bench_settings(module, args, command)
    if job == "submit" and args is not None:
        submitted = getattr(args, "job", None)
        job_args = [a for a in getattr(args, "job_args", []) if a != "--"]
        if submitted:
            check_job(f"jobs.{submitted}", job_args, command)


def makefile_targets() -> set[str]:
    targets: set[str] = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.$()/ -]+):(?!=)", line)
        if match and not line.startswith("\t"):
            targets.update(match.group(1).split())
    return targets


def check_make(argv: list[str], command: Command) -> None:
    targets = makefile_targets()
    named = [word for word in argv if "=" not in word and not word.startswith("-")]
    unknown = [word for word in named if word not in targets]
    assert not unknown, f"{command}: no Makefile target {', '.join(unknown)}"


COMMANDS_FOUND = [c for c in documented_commands() if ours(c)]


def test_the_docs_have_commands_to_check() -> None:
    names = {c.words[1] for c in COMMANDS_FOUND if c.words[0] in FLOWRAYS and len(c.words) > 1}
    # The guide shows the commands a newcomer runs after the demo.
    assert {"models", "score", "scores", "sample", "serve", "train", "submit"} <= names


@pytest.mark.parametrize("command", COMMANDS_FOUND, ids=str)
def test_documented_command_parses(command: Command) -> None:
    words = list(command.words)
    if words[0] in FLOWRAYS:
        check_flowray(words[1:], command)
    elif words[0] == "make":
        check_make(words[1:], command)
    else:
        job = job_words(command.words)
        check_job(job[2], list(job[3:]), command)


def example_job() -> ModuleType:
    """A job module whose parser takes `--number N` and `--name X`."""
    module = ModuleType("example_job")

    def parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog="flowray example")
        p.add_argument("--number", type=int)
        p.add_argument("--name")
        return p

    module.parser = parser  # type: ignore[attr-defined]
    return module


def test_a_documented_command_parses_with_its_own_parser() -> None:
    good = Command("example", ("flowray", "example", "--number", "3", "--name", "x"))
    args = parse(example_job(), ["--number", "3", "--name", "x"], good)
    assert (args.number, args.name) == (3, "x")


def test_a_command_with_an_unknown_option_fails_the_check() -> None:
    bad = Command("example", ("flowray", "example", "--no-such-option", "1"))
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments: --no-such-option"):
        parse(example_job(), ["--no-such-option", "1"], bad)


def test_an_abbreviated_option_fails_the_check() -> None:
    short = Command("example", ("flowray", "example", "--num", "3"))
    with pytest.raises(pytest.fail.Exception, match="--num"):
        parse(example_job(), ["--num", "3"], short)


def test_an_unknown_command_fails_the_check() -> None:
    bad = Command("example", ("flowray", "no-such-command"))
    with pytest.raises(AssertionError, match="no such command 'no-such-command'"):
        check_flowray(["no-such-command"], bad)


def test_an_unknown_make_target_fails_the_check() -> None:
    bad = Command("example", ("make", "demo", "no-such-target", "WORKDIR=x"))
    with pytest.raises(AssertionError, match="no Makefile target no-such-target"):
        check_make(["demo", "no-such-target", "WORKDIR=x"], bad)


def test_three_alternatives_on_continuation_lines_are_one_command() -> None:
    block = "flowray score --model m --output o \\\n    --input a   # one\n    --input b\n"
    lines = command_lines("bash", block, 1)
    assert [n for n, _ in lines] == [1, 3]
    assert simple_commands(lines[0][1]) == [
        ["flowray", "score", "--model", "m", "--output", "o", "--input", "a"]
    ]


def test_shell_variables_become_a_word_and_operators_split_commands() -> None:
    line = 'make s3-up && FOO=1 flowray score --output "s3://$BUCKET/x" & echo ${HOME}'
    assert simple_commands(line) == [
        ["make", "s3-up"],
        ["flowray", "score", "--output", "s3://VAR/x"],
        ["echo", "VAR"],
    ]


def test_console_blocks_keep_prompt_lines_only() -> None:
    block = "$ flowray models list\nfashion-flow  v1  champion\n$ flowray --version\n"
    assert [line for _, line in command_lines("console", block, 10)] == [
        "flowray models list",
        "flowray --version",
    ]


# The README's Python API example, run as printed. Only the `fashion-mnist` preset it loads is
# swapped for a tiny model of the same image shape, so that it trains in seconds.
TINY_PRESET = """
model: {image_shape: [1, 28, 28], levels: 2, steps_per_level: 1, hidden_channels: 8}
data: {train: flowray-work/data/train, validation: flowray-work/data/test, validation_limit: 100}
optim: {warmup_steps: 2}
scaling: {num_workers: 1, cpus_per_worker: 0.5}
run: {name: fashion-flow, storage_path: flowray-work/runs}
mlflow: {registered_model: fashion-flow}
batch_size: 16
max_steps: 4
eval_every: 4
checkpoint_every: 4
log_every: 2
eval_batch_size: 50
init_images: 32
"""


def python_example() -> str:
    blocks = [
        text for _, language, text in shell_blocks(ROOT / "README.md") if language == "python"
    ]
    assert len(blocks) == 1, f"README.md: expected one python block, found {len(blocks)}"
    return blocks[0]


# In the integration tier (it uses ray_local), which CI runs: Ray Train, scoring actors and
# sampling tasks on a tiny model, 1-2 minutes on 2 busy cores.
def test_the_readme_python_example_runs(
    ray_local: None,
    fashion_mnist_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import pipeline.config
    from pipeline.data.shards import prepare
    from pipeline.data.sources import open_source

    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "FLOWRAY_WORKDIR", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    prepare(
        open_source(f"idx:{fashion_mnist_dir}"), "flowray-work/data", shard_samples=100, limit=200
    )
    (tmp_path / "tiny.yaml").write_text(TINY_PRESET)
    real = pipeline.config.preset_path
    monkeypatch.setattr(
        pipeline.config,
        "preset_path",
        lambda name: tmp_path / "tiny.yaml" if name == "fashion-mnist" else real(name),
    )

    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(python_example(), "README.md (python example)", "exec"), namespace)

    trained, scored, sampled = namespace["trained"], namespace["scored"], namespace["sampled"]
    assert trained.steps == 4 and trained.model_name == "fashion-flow"
    assert scored.images_scored == 200
    assert 0.0 < scored.mean_bits_per_dim < 16.0
    assert sampled.images == 16
    assert (tmp_path / "flowray-work" / "mlflow.db").is_file()
    printed = capsys.readouterr().out
    assert f"{scored.mean_bits_per_dim:.4f}" in printed


LINK = re.compile(r"\]\(([^)\s]+)\)|<img src=\"([^\"]+)\"")


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces
    as hyphens (fenced blocks skipped)."""
    text = FENCE.sub("", path.read_text())
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.MULTILINE):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


def test_links_between_the_docs_resolve() -> None:
    broken = []
    for path in DOCS:
        for target, image in LINK.findall(FENCE.sub("", path.read_text())):
            url = target or image
            if re.match(r"[a-z]+:", url):  # http(s)://, mailto:
                continue
            file, _, anchor = url.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.relative_to(ROOT)}: {url} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
                broken.append(f"{path.relative_to(ROOT)}: {url} (no such heading)")
    assert not broken, "\n".join(broken)


def test_documented_test_paths_exist() -> None:
    """`python -m pytest <path>` lines in the docs name test files that exist."""
    missing = []
    for command in documented_commands():
        words = command.words
        if words[0] in PYTHONS and words[1:3] == ("-m", "pytest"):
            for word in words[3:]:
                if word.startswith("tests/") and not (ROOT / word.split("::")[0]).exists():
                    missing.append(f"{command.where}: {word}")
    assert not missing, "\n".join(missing)


CODE_PATH = re.compile(r"`((?:flowmodel|pipeline|jobs|tests|infra|docs)/[\w/.-]*\w)`")
CODE_NAME = re.compile(r"`((?:flowmodel|pipeline|jobs)(?:\.\w+)+)`")


def resolves(dotted: str) -> bool:
    """`pipeline.a.b` names a module, or an attribute of one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(target, name):
                return False
            target = getattr(target, name)
        return True
    return False


def test_code_named_in_the_docs_exists() -> None:
    """Files (`pipeline/model/pyfunc.py`) and modules or names (`pipeline.model.mersenne`) that
    the docs cite in backticks exist."""
    missing = []
    for path in DOCS:
        text = path.read_text()
        for cited in CODE_PATH.findall(text):
            if not (ROOT / cited).exists():
                missing.append(f"{path.relative_to(ROOT)}: {cited} (no such file)")
        for cited in CODE_NAME.findall(text):
            if not resolves(cited):
                missing.append(f"{path.relative_to(ROOT)}: {cited} (no such module or name)")
    assert not missing, "\n".join(missing)
