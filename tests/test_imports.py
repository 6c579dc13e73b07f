"""The import rules: each package's `__init__` docstring says what its modules may import, and
every import in flowmodel/, pipeline/ and jobs/ keeps to it; no module imports itself back.

How the rules are read. A package's docstring holds one sentence `May import: <names>.` (the
colon is optional), where names are project modules or packages (`pipeline.{config,storage}` is
shorthand for both), remarks in parentheses are ignored, and names after "never" or "not" are
exclusions. A module that needs other rules than its package gets its own sentence in the
package's docstring: `jobs._batch may import: <names>.` A module may always import the modules
of its own package. A package whose third-party imports are limited lists them in a sentence
`Third-party imports: torch, numpy.`; the standard library is always allowed.

How the code is read. Every .py file is parsed with `ast`; every `import x` and `from x import y`
counts, at module level or inside a function, a class or `if TYPE_CHECKING:`. Relative imports are
resolved against the importing module. Each import of a project module is resolved to the module
it loads: `from pipeline.model import noise` to pipeline.model.noise (a submodule), `from
flowmodel import Flow` to flowmodel (the package's `__init__`).

How cycles are found. The graph has an edge from each module to each project module it imports
when it is itself imported: the module-level statements, including those inside a top-level `if`,
`try` or `with`, but not function bodies (imported when called) and not `if TYPE_CHECKING:` blocks
(never run). A depth-first search over that graph marks the modules on its current path; an edge
back to one of them is a cycle, reported as the path from that module round to itself.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("flowmodel", "pipeline", "jobs")

# The direction of DESIGN.md: jobs -> batch/train/serve/bench -> model/data/tracking -> the shared
# top-level modules of pipeline (config, storage, plots, submission, local_ray) ->
# flowmodel. A room is a top-level package, or a subpackage of pipeline with everything under it;
# "pipeline" itself is the room of the shared top-level modules.
LAYERS = {
    "flowmodel": 0,
    "pipeline": 1,
    "pipeline.model": 2,
    "pipeline.data": 2,
    "pipeline.tracking": 2,
    "pipeline.batch": 3,
    "pipeline.train": 3,
    "pipeline.serve": 3,
    "pipeline.bench": 3,
    "jobs": 4,
}
# Rules that point sideways, each with its reason.
SIDEWAYS = {
    ("pipeline.tracking", "pipeline.model"): "the registry logs and loads model artifacts",
    ("pipeline.serve", "pipeline.batch"): "an answer is the score job's row (Scorer, resolver)",
    ("pipeline.bench", "pipeline.batch"): "benchmarks measure the production code",
    ("pipeline.bench", "pipeline.train"): "benchmarks measure the production code",
    ("pipeline.bench", "pipeline.serve"): "benchmarks measure the production code",
}
BENCH = "pipeline.bench"
# The modules that may import the benchmarks: themselves and the command that runs them.
BENCH_IMPORTERS = ("pipeline.bench", "jobs.bench")


# --- the project's modules -------------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    name: str  # dotted: "pipeline.batch.sampling"; a package is named by its __init__
    path: Path
    is_package: bool

    @property
    def package(self) -> str:
        """The package whose rules apply: a package's own, else the one that holds it."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


def project_modules(root: Path = ROOT) -> dict[str, Module]:
    modules = {}
    for top in PROJECT:
        for path in sorted((root / top).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            modules[name] = Module(name, path, is_package)
    return modules


def packages_without_init(root: Path = ROOT) -> list[str]:
    """Folders holding Python modules but no __init__.py (namespace packages), as dotted names."""
    missing = set()
    for top in PROJECT:
        for path in (root / top).rglob("*.py"):
            folder = path.parent
            while folder != root:
                if not (folder / "__init__.py").exists():
                    missing.add(".".join(folder.relative_to(root).parts))
                folder = folder.parent
    return sorted(missing)


# --- the rules ---------------------------------------------------------------------------------


@dataclass
class Rule:
    """What the modules it covers may import (project names as prefixes) and what not."""

    source: str  # where it is written: a package's __init__
    allowed: tuple[str, ...]
    excluded: tuple[str, ...] = ()
    third_party: tuple[str, ...] | None = None  # None: any third-party import

    def allows(self, target: str) -> bool:
        return any(_covers(name, target) for name in self.allowed) and not any(
            _covers(name, target) for name in self.excluded
        )


def _covers(name: str, target: str) -> bool:
    return target == name or target.startswith(name + ".")


_PACKAGE_RULE = re.compile(r"^[ \t]*May import\b:?(?P<body>.*?)\.(?=\s|$)", re.M | re.S)
_MODULE_RULE = re.compile(
    r"^[ \t]*(?P<module>[A-Za-z_][\w.]*) may import\b:?(?P<body>.*?)\.(?=\s|$)", re.M | re.S
)
_THIRD_PARTY = re.compile(r"^[ \t]*Third-party imports:(?P<body>.*?)\.(?=\s|$)", re.M | re.S)
_NAME = re.compile(r"(?<![\w.'])(?:flowmodel|pipeline|jobs)(?:\.(?:\w+|\{[^}]*\}))*(?!['\w])")
_NEGATION = re.compile(r"\b(?:never|not)\b")


def names_in(text: str) -> list[str]:
    """The project names in a rule's text, braces expanded: `pipeline.{a,b}` -> two names."""
    text = re.sub(r"\([^)]*\)", " ", text)  # remarks
    names = []
    for match in _NAME.finditer(text):
        expanded = [""]
        for part in re.findall(r"\{[^}]*\}|[^.{}]+", match.group(0)):
            choices = [c.strip() for c in part[1:-1].split(",")] if part[0] == "{" else [part]
            expanded = [f"{head}.{c}" if head else c for head in expanded for c in choices]
        names.extend(expanded)
    return names


def parse_rule(body: str, source: str) -> Rule:
    body = re.sub(r"\([^)]*\)", " ", body)
    negation = _NEGATION.search(body)
    allowed = body if negation is None else body[: negation.start()]
    excluded = "" if negation is None else body[negation.end() :]
    return Rule(source, tuple(names_in(allowed)), tuple(names_in(excluded)))


@dataclass
class Rules:
    packages: dict[str, Rule] = field(default_factory=dict)
    modules: dict[str, Rule] = field(default_factory=dict)  # per-module rules
    problems: list[str] = field(default_factory=list)  # rules missing or naming nothing

    def rule_for(self, module: Module) -> Rule | None:
        return self.modules.get(module.name) or self.packages.get(module.package)


def read_rules(modules: dict[str, Module]) -> Rules:
    rules = Rules()
    for module in modules.values():
        if not module.is_package:
            continue
        doc = ast.get_docstring(ast.parse(module.path.read_text())) or ""
        where = str(module.path.relative_to(ROOT))
        package_rules = list(_PACKAGE_RULE.finditer(doc))
        if len(package_rules) != 1:
            rules.problems.append(
                f"{where}: expected one 'May import: ...' sentence, found {len(package_rules)}"
            )
            continue
        rule = parse_rule(package_rules[0]["body"], where)
        third = _THIRD_PARTY.search(doc)
        if third is not None:
            rule.third_party = tuple(n.strip() for n in third["body"].split(",") if n.strip())
        rules.packages[module.name] = rule
        for match in _MODULE_RULE.finditer(doc):
            named = match["module"]
            if named not in modules or modules[named].package != module.name:
                rules.problems.append(
                    f"{where}: a rule for {named}, expected a module of {module.name}"
                )
                continue
            module_rule = parse_rule(match["body"], where)
            module_rule.third_party = rule.third_party
            rules.modules[named] = module_rule
    for rule in [*rules.packages.values(), *rules.modules.values()]:
        for name in rule.allowed + rule.excluded:
            if not any(_covers(name, m) for m in modules):
                rules.problems.append(f"{rule.source}: {name} names no module of the project")
    return rules


# --- the imports -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    target: str  # dotted name as written, resolved to a project module where it is one
    line: int
    at_import: bool  # runs when the importing module is imported (an edge for cycles)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def read_imports(module: Module, source: str, modules: dict[str, Module]) -> list[Import]:
    """Every import in `source` (the text of `module`), with the module each one loads."""
    found: list[Import] = []

    def resolve(name: str) -> str:
        """The longest prefix of `name` that is a project module, or `name` itself."""
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in modules:
                return ".".join(parts[:end])
        return name

    def visit(node: ast.AST, at_import: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(resolve(alias.name), node.lineno, at_import))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: against this module's package
                anchor = module.package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                target = submodule if submodule in modules else resolve(base)
                found.append(Import(target, node.lineno, at_import))
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, at_import)
            return
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            at_import = False
        for child in ast.iter_child_nodes(node):
            visit(child, at_import)

    visit(ast.parse(source), True)
    return found


def violations(
    module: Module, imports: list[Import], rules: Rules, modules: dict[str, Module]
) -> list[str]:
    """One line per import that `module`'s rule does not allow."""
    rule = rules.rule_for(module)
    if rule is None:
        return [f"{module.path.relative_to(ROOT)}: no rule covers {module.name}"]
    lines = []
    for item in imports:
        where = f"{module.path.relative_to(ROOT)}:{item.line}: {module.name} imports {item.target}"
        top = item.target.split(".")[0]
        if top in sys.stdlib_module_names:
            continue
        if top not in PROJECT:
            if rule.third_party is not None and top not in rule.third_party:
                allowed = ", ".join(rule.third_party)
                lines.append(f"{where} (allowed outside the project: {allowed})")
            continue
        if item.target not in modules:
            lines.append(f"{where}, which is no module of the project")
            continue
        own = modules[item.target].package == module.package or item.target == module.package
        if not (own or rule.allows(item.target)):
            lines.append(f"{where} ({rule.source} allows {', '.join(rule.allowed) or 'nothing'})")
    return lines


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Depth-first search; an edge back to a module on the current path closes a cycle."""
    cycles: list[list[str]] = []
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in done:
                visit(nxt)
        on_path.discard(node)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)
    return cycles


def import_graph(modules: dict[str, Module]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module in modules.values():
        imports = read_imports(module, module.path.read_text(), modules)
        graph[module.name] = {
            i.target
            for i in imports
            if i.at_import and i.target in modules and i.target != module.name
        }
    return graph


def room(name: str) -> str:
    """`pipeline.batch.scoring.job` -> pipeline.batch; `pipeline.storage` -> pipeline."""
    parts = name.split(".")
    if parts[0] == "pipeline" and len(parts) > 1 and ".".join(parts[:2]) in LAYERS:
        return ".".join(parts[:2])
    return parts[0]


# --- the tests ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return project_modules()


@pytest.fixture(scope="module")
def rules(modules: dict[str, Module]) -> Rules:
    return read_rules(modules)


def test_every_package_says_what_it_may_import(modules: dict[str, Module], rules: Rules) -> None:
    assert packages_without_init() == []
    assert rules.problems == []
    packages = sorted(m.name for m in modules.values() if m.is_package)
    assert sorted(rules.packages) == packages


def test_the_rules_follow_the_direction_of_the_design(
    modules: dict[str, Module], rules: Rules
) -> None:
    """No rule lets a module import upwards (jobs -> batch/train/serve/bench -> model/data/
    tracking -> shared modules -> flowmodel) except the sideways pairs named with their reason;
    only the benchmarks and their command may import pipeline.bench."""
    rooms = sorted({room(m) for m in modules})
    assert set(rooms) == set(LAYERS), "a new room needs its place in LAYERS"
    upward = []
    for holder, rule in [*rules.packages.items(), *rules.modules.items()]:
        for name in rule.allowed:
            for reached in rooms:
                if not (_covers(name, reached) or _covers(reached, name)):
                    continue
                if reached == room(holder) or LAYERS[reached] < LAYERS[room(holder)]:
                    continue
                if (room(holder), reached) not in SIDEWAYS:
                    upward.append(f"{holder} -> {name} (reaches {reached})")
        if not holder.startswith(BENCH_IMPORTERS):
            assert not rule.allows(BENCH), f"{holder} may import the benchmarks"
    assert upward == []
    assert rules.packages["flowmodel"].allowed == ("flowmodel",)
    assert rules.packages["flowmodel"].third_party == ("torch", "numpy")
    assert not rules.modules["jobs._batch"].allows("pipeline.train.reporting")
    assert not rules.packages[BENCH].allows("jobs.config")


def test_every_import_keeps_to_its_packages_rule(modules: dict[str, Module], rules: Rules) -> None:
    found = []
    for module in modules.values():
        found += violations(
            module, read_imports(module, module.path.read_text(), modules), rules, modules
        )
    assert found == [], "imports that break the rules:\n" + "\n".join(found)


def test_no_module_imports_itself_back(modules: dict[str, Module]) -> None:
    cycles = find_cycles(import_graph(modules))
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


# The checker itself, on imports written into real modules' text.
FORBIDDEN = [
    ("flowmodel.layers", "import ray\n", "flowmodel.layers imports ray"),
    ("flowmodel.flow", "from pipeline.storage import join_url\n", "imports pipeline.storage"),
    (
        "pipeline.batch.sampling",
        "def f():\n    from pipeline.bench import quality\n",
        "imports pipeline.bench",
    ),
    ("pipeline.bench", "from jobs.config import load_config\n", "imports jobs.config"),
    (
        "jobs._batch",
        "def f():\n    from pipeline.train.reporting import say\n",
        "imports pipeline.train.reporting",
    ),
    ("pipeline.model.artifact", "import ray.data\n", "imports ray.data"),
    ("pipeline.storage", "from pipeline.data import inputs\n", "imports pipeline.data.inputs"),
    (
        "pipeline.train.step",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline.batch import top\n",
        "imports pipeline.batch.top",
    ),
]


@pytest.mark.parametrize(("name", "added", "expected"), FORBIDDEN)
def test_a_forbidden_import_is_reported(
    modules: dict[str, Module], rules: Rules, name: str, added: str, expected: str
) -> None:
    module = modules[name]
    text = module.path.read_text()
    before = violations(module, read_imports(module, text, modules), rules, modules)
    after = violations(module, read_imports(module, text + added, modules), rules, modules)
    new = [line for line in after if line not in before]
    assert len(new) == 1 and expected in new[0], new


def test_allowed_imports_are_not_reported(modules: dict[str, Module], rules: Rules) -> None:
    allowed = {
        "flowmodel.layers": "import numpy\nimport math\nfrom flowmodel.typed import to_dict\n",
        "pipeline.batch.sampling": "from pipeline.batch.scoring import job\nimport ray\n",
        "jobs.bench": "from pipeline.bench import quality\n",
        "pipeline.tracking.registry": "from pipeline.model import artifact\n",
        "pipeline.model.pyfunc": "def f():\n    import mlflow.pyfunc\n",
    }
    for name, added in allowed.items():
        module = modules[name]
        imports = read_imports(module, added, modules)
        assert violations(module, imports, rules, modules) == [], name


def test_imports_resolve_to_the_module_they_load(modules: dict[str, Module]) -> None:
    module = modules["pipeline.model.noise"]
    source = (
        "from pipeline.model import mersenne\nfrom flowmodel import Flow\n"
        "import pipeline.storage as s\nfrom . import splitmix\nfrom .artifact import load_flow\n"
        "def f():\n    import ray.train\n"
    )
    found = [(i.target, i.at_import) for i in read_imports(module, source, modules)]
    assert found == [
        ("pipeline.model.mersenne", True),
        ("flowmodel", True),
        ("pipeline.storage", True),
        ("pipeline.model.splitmix", True),
        ("pipeline.model.artifact", True),
        ("ray.train", False),
    ]


def test_cycles_are_found_with_their_path() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_rule_sentences_are_read_with_braces_remarks_and_exclusions() -> None:
    rule = parse_rule(
        " flowmodel, pipeline.{model, data} (never pipeline.bench here), pipeline's own;"
        " never pipeline.data.shards",
        "x",
    )
    assert rule.allowed == ("flowmodel", "pipeline.model", "pipeline.data")
    assert rule.excluded == ("pipeline.data.shards",)
    assert rule.allows("pipeline.data.inputs") and not rule.allows("pipeline.data.shards")
    assert not rule.allows("pipeline.model_extra") and not rule.allows("pipeline")
