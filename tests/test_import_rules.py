"""The import rules of the code layout (README, "Code layout"), checked on the source with `ast`.

Every module under src/ehrmotor is parsed; each `import x`, `from x import y` (relative ones
resolved) and `importlib.import_module("x")` with a literal name counts, at the top of the module,
under `if TYPE_CHECKING:` or inside a function (an import deferred for speed is still a
dependency). `from package import name` counts as importing the module `package.name` when there
is one, else `package`. The parts of the package:

- stages, one command's work each: prepare, pretrain, embed, finetune, evaluate, convert;
- the command line: cli (and __main__, `python -m ehrmotor`), which hands each stage what it needs;
- libraries, what the stages stand on: vocabulary, sequences, motor_task, model, meds, femr;
- the producer: synthetic, the generator of synthetic MEDS data;
- shared modules: the other top-level modules (config, errors, artifacts, bundle, trainer, ...);
- the package root (`ehrmotor/__init__.py`, the public `ehrmotor.compute_features`), which may
  name a stage.

The rules: (a) no stage imports another stage; (b) no library imports a stage or the generator;
(c) `model` imports nothing of the data libraries (it knows tensors only); (d) nothing imports the
command line; (e) nothing but the command line imports the generator; (f) no shared module
imports a stage. EXCEPTIONS lists the pairs let through, each with its reason.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "ehrmotor"
STAGES = frozenset({"prepare", "pretrain", "embed", "finetune", "evaluate", "convert"})
CLI = "cli"
ENTRY_POINTS = {"__main__": CLI}  # `python -m ehrmotor` is the command line
LIBRARIES = frozenset({"vocabulary", "sequences", "motor_task", "model", "meds", "femr"})
PRODUCERS = frozenset({"synthetic"})
TENSORS_ONLY = {"model": frozenset({"meds", "vocabulary", "sequences", "motor_task", "femr"})}
# (module, imported module) -> why the pair is let through; keep it empty.
EXCEPTIONS: dict[tuple[str, str], str] = {}

RULES = {
    "a": "a stage imports another stage",
    "b": "a library imports a stage or the generator",
    "c": "model imports a data library",
    "d": "imports the command line",
    "e": "imports the generator",
    "f": "a shared module imports a stage",
}


@dataclass(frozen=True, order=True)
class Violation:
    rule: str
    module: str
    imported: str

    def __str__(self) -> str:
        return f"({self.rule}) {self.module} imports {self.imported}: {RULES[self.rule]}"


def module_files(source: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file of every module of `package` under `source`."""
    found = {}
    for path in sorted((source / package).rglob("*.py")):
        parts = path.relative_to(source).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imported_names(tree: ast.AST, module: str, is_package: bool,
                    known: Iterable[str]) -> set[str]:
    modules = set(known)
    here = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                child = f"{source}.{alias.name}"
                names.add(child if child in modules else source)
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"):
            names.add(node.args[0].value)
    return names


def import_graph(source: Path, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports (itself left out)."""
    files = module_files(source, package)
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        names = _imported_names(tree, module, path.name == "__init__.py", files)
        graph[module] = {name for name in names
                         if (name == package or name.startswith(package + "."))
                         and name != module}
    return graph


def part(module: str, package: str = PACKAGE) -> str | None:
    """The top-level part a module belongs to (None: the package root)."""
    if module == package:
        return None
    first = module.removeprefix(package + ".").split(".")[0]
    return ENTRY_POINTS.get(first, first)


def broken_rules(importer: str | None, imported: str | None, shared: bool) -> list[str]:
    """The rules an import from part `importer` of part `imported` breaks (`shared`: the
    importer is a shared module)."""
    if importer is None or imported is None or importer == imported:
        return []
    rules = []
    if importer in STAGES and imported in STAGES:
        rules.append("a")
    if importer in LIBRARIES and (imported in STAGES or imported in PRODUCERS):
        rules.append("b")
    if imported in TENSORS_ONLY.get(importer, ()):
        rules.append("c")
    if imported == CLI:
        rules.append("d")
    if imported in PRODUCERS and importer != CLI:
        rules.append("e")
    if shared and imported in STAGES:
        rules.append("f")
    return rules


def violations(graph: Mapping[str, Iterable[str]], package: str = PACKAGE) -> list[Violation]:
    """Every (rule, module, imported module) the graph breaks, sorted."""
    classified = STAGES | LIBRARIES | PRODUCERS | {CLI}
    found = []
    for module, imports in graph.items():
        importer = part(module, package)
        shared = importer is not None and importer not in classified
        for imported in imports:
            for rule in broken_rules(importer, part(imported, package), shared):
                found.append(Violation(rule, module, imported))
    return sorted(found)


def unplaced(source: Path, package: str = PACKAGE) -> list[str]:
    """Subpackages of `package` that are in no part: each must be a stage, a library or the
    producer (a shared module is a single file)."""
    places = STAGES | LIBRARIES | PRODUCERS
    return sorted(path.parent.name for path in (source / package).glob("*/__init__.py")
                  if path.parent.name not in places)


def report(found: Iterable[Violation]) -> str:
    return "\n".join(str(violation) for violation in found)


def test_the_package_keeps_its_import_rules() -> None:
    found = violations(import_graph(SOURCE))
    broken = [v for v in found if (v.module, v.imported) not in EXCEPTIONS]
    assert not broken, "import rules broken:\n" + report(broken)
    stale = set(EXCEPTIONS) - {(v.module, v.imported) for v in found}
    assert not stale, f"exceptions no longer needed (remove them): {sorted(stale)}"


def test_every_subpackage_is_a_stage_a_library_or_the_producer() -> None:
    assert not unplaced(SOURCE), f"subpackages in no part: {unplaced(SOURCE)}"


def test_the_import_graph_sees_every_kind_of_import() -> None:
    graph = import_graph(SOURCE)
    assert "ehrmotor.artifacts" in graph["ehrmotor.pretrain.run"]  # from ehrmotor import artifacts
    assert "ehrmotor.model" in graph["ehrmotor"]  # importlib.import_module("ehrmotor.model")
    assert "ehrmotor.embed" in graph["ehrmotor"]  # inside a function
    assert "ehrmotor.prepare" in graph["ehrmotor.cli"]  # from ehrmotor.prepare import prepare


FAKE = {
    # one import breaking each rule, and imports breaking none
    "__init__.py": "def __getattr__(name):\n    from ehrmotor.embed import features\n",
    "__main__.py": "from ehrmotor.cli import main\n",
    "cli.py": "import ehrmotor.prepare\nfrom ehrmotor.synthetic import generate\n",
    "config.py": "",
    "bundle.py": "from ehrmotor import config\nfrom ehrmotor.embed.features import go\n",  # f
    "prepare/__init__.py": "",
    "prepare/run.py": "from ehrmotor.vocabulary import tokenizer\nfrom . import steps\n",
    "prepare/steps.py": "from ehrmotor.bundle import Bundle\n",
    "pretrain/__init__.py": "",
    "pretrain/run.py": "def run():\n    from ..prepare.steps import x\n",  # a, relative
    "embed/__init__.py": "",
    "embed/features.py": "from ehrmotor.sequences import windows\n",
    "evaluate/__init__.py": "",
    "evaluate/commands.py": "from ehrmotor.synthetic.outcomes import codes\n",  # e
    "finetune/__init__.py": "",
    "finetune/run.py": "from ehrmotor import cli\n",  # d
    "sequences/__init__.py": "",
    "sequences/windows.py": "import importlib\nimportlib.import_module('ehrmotor.finetune.run')\n",
    "vocabulary/__init__.py": "",
    "vocabulary/tokenizer.py": "from ehrmotor.synthetic import catalog\n",  # b, e
    "model/__init__.py": "",
    "model/encoder.py": "def f():\n    from ehrmotor.sequences.windows import w\n",  # c
    "synthetic/__init__.py": "",
    "synthetic/generate.py": "from . import catalog\nfrom ehrmotor import config\n",
    "synthetic/catalog.py": "",
    "synthetic/outcomes.py": "",
    "extras/__init__.py": "",
}


@pytest.fixture
def fake_source(tmp_path: Path) -> Path:
    for name, text in FAKE.items():
        path = tmp_path / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_checker_reports_each_broken_rule_and_nothing_else(fake_source: Path) -> None:
    found = violations(import_graph(fake_source))
    assert found == sorted([
        Violation("a", "ehrmotor.pretrain.run", "ehrmotor.prepare.steps"),
        Violation("b", "ehrmotor.sequences.windows", "ehrmotor.finetune.run"),
        Violation("b", "ehrmotor.vocabulary.tokenizer", "ehrmotor.synthetic.catalog"),
        Violation("c", "ehrmotor.model.encoder", "ehrmotor.sequences.windows"),
        Violation("d", "ehrmotor.finetune.run", "ehrmotor.cli"),
        Violation("e", "ehrmotor.evaluate.commands", "ehrmotor.synthetic.outcomes"),
        Violation("e", "ehrmotor.vocabulary.tokenizer", "ehrmotor.synthetic.catalog"),
        Violation("f", "ehrmotor.bundle", "ehrmotor.embed.features"),
    ]), report(found)
    assert "(c) ehrmotor.model.encoder imports ehrmotor.sequences.windows" in report(found)
    assert unplaced(fake_source) == ["extras"]
