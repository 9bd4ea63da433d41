"""The package layout: no import cycle between modules, and every package imports only the packages
it is allowed to (ALLOWED, low to high: the pipeline data and tasks -> sampling -> rewards -> the math
(objectives) -> algorithms -> commands, with runtime and the doctrine tools apart).

Every module under src/posttrain is parsed with `ast`, nothing is imported. Every import statement
counts, also those inside functions (a lazy import is still a dependency) and under
``if TYPE_CHECKING:``: ``import posttrain.x.y``, ``from posttrain.x import y`` (the module
``posttrain.x.y`` when it is one, else ``posttrain.x``), ``from posttrain import x`` and relative
imports.

Cycles: the graph of those import statements, module to module. Nothing is ignored: a package's
``__init__`` importing its own submodules is an edge like any other (none closes a cycle). Two
simplifications: importing ``posttrain.a.b`` also runs ``posttrain/a/__init__.py``, an edge that is
not added; and the registries' dynamic imports (below) are left out of the cycle check, since they
load lazily by design (``posttrain.rewards`` names ``posttrain.rewards.math``, which imports
``as_text`` from ``posttrain.rewards``).

Layering: the same edges plus those dynamic imports: a string constant naming a posttrain module,
``"posttrain.x.y"`` or ``"posttrain.x.y:attr"`` (the reward and task registries,
``importlib.import_module``), is a dependency on that module. Imports within a package are free.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
ROOT = "posttrain"  # the package root's own __init__ (``__version__``)

# package -> the packages it may import (besides itself). Low to high.
ALLOWED: dict[str, set[str]] = {
    # the package root: the version string, imports nothing
    ROOT: set(),
    # the error contract's base classes (UserError): imports nothing, every package may import it
    "errors": set(),
    # model specs, loading, the embedded model, LoRA ranks, the trunk/head split: the base layer
    "models": set(),
    # dataset files, their formats (prompt_text, as_text, chat) and the built-in tasks: plain Python
    "data": set(),
    # configs, checkpoints, tracking, CPU threads, distributed/FSDP (FSDP wraps the models' decoder layers);
    # config files are read with the data layer's UTF-8 reader
    "runtime": {"models", "data"},
    # the sampling engine: generation, KV cache, the rollout copy of the policy (synced across ranks)
    "sampling": {"runtime", "models", "data"},
    # the math: log-probs, the shared-prompt forward over sampled rollouts, value head, advantages, losses
    "objectives": {"runtime", "models", "sampling"},
    # AI judges: local judges sample with the engine, HTTP ones need only data and the configs
    "rlaif": {"runtime", "models", "data", "sampling"},
    # reward functions: the judge reward wraps rlaif, the reward-model scorer runs a value head (objectives)
    "rewards": {"runtime", "models", "data", "objectives", "rlaif"},
    # multi-turn environments (plain Python): the built-in tasks' rows and rewards, the fault guard, tools
    "envs": {"data", "rewards"},
    # method selection, memory estimates, reports, the doctor, probes: read runs and specs, never train
    "doctrine": {"runtime", "models", "data", "sampling", "objectives", "rewards", "envs"},
    # the trainers: everything below; the Run calls the doctor (doctrine) at every step and at the end
    "algorithms": {"runtime", "models", "data", "sampling", "objectives", "rlaif", "rewards", "envs", "doctrine"},
    # human review of runs (the review page's server and labels): reads runs, the doctor's flags and plots
    "review": {"runtime", "doctrine"},
    # one module per CLI verb: any layer (``info`` reads the root's version)
    "commands": {ROOT, "runtime", "models", "data", "sampling", "objectives", "rlaif", "rewards", "envs", "doctrine",
                 "algorithms", "review"},
    # the `posttrain` command: finds the verbs in commands
    "cli": {"commands"},
    # `python -m posttrain`
    "__main__": {"cli"},
}
for _package in set(ALLOWED) - {ROOT, "errors"}:
    ALLOWED[_package].add("errors")  # every layer raises the error contract's UserError subclasses


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package)."""
    out = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


MODULES = _modules()


def _existing(name: str) -> str | None:
    """``name`` or its nearest enclosing module that exists under src."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(modules named by import statements, modules named by registry strings) of ``module``."""
    path, is_pkg = MODULES[module]
    package = module if is_pkg else module.rpartition(".")[0]
    statements, strings = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == ROOT or alias.name.startswith(ROOT + "."):
                    statements.add(_existing(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if source != ROOT and not source.startswith(ROOT + "."):
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                statements.add(full if full in MODULES else _existing(source))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            name = node.value.partition(":")[0]
            if name in MODULES and name != ROOT:
                strings.add(name)
    statements.discard(None)
    statements.discard(module)
    strings.discard(module)
    return statements, strings - statements


GRAPH = {m: _imports(m) for m in MODULES}


def package_of(module: str) -> str:
    """``posttrain.doctrine.doctor.core`` -> ``doctrine``; ``posttrain`` -> ROOT."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan, iterative), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def test_the_parser_sees_lazy_and_package_imports():
    statements, _ = GRAPH["posttrain.commands.report"]
    assert "posttrain.doctrine.report" in statements  # inside run(): a lazy import counts
    statements, _ = GRAPH["posttrain.doctrine.memory"]
    assert "posttrain.models" in statements  # `from posttrain import models`: the module
    statements, _ = GRAPH["posttrain.cli"]
    assert "posttrain.commands" in statements
    _, strings = GRAPH["posttrain.data.tasks"]
    assert "posttrain.data.tasks.arithmetic" in strings  # the task registry's "module:attr"
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_modules():
    edges = {m: statements for m, (statements, _) in GRAPH.items()}
    report = []
    for component in _cycles(edges):
        inside = set(component)
        report.append("cycle: " + ", ".join(f"{a} -> {b}" for a in component for b in sorted(edges[a] & inside)))
    assert not report, "\n".join(report)


def test_every_package_is_in_the_table_and_the_table_is_layered():
    packages = {package_of(m) for m in MODULES}
    assert packages == set(ALLOWED), f"not in ALLOWED: {packages - set(ALLOWED)}; gone: {set(ALLOWED) - packages}"
    assert all(deps <= set(ALLOWED) for deps in ALLOWED.values())
    assert _cycles(ALLOWED) == [], "ALLOWED must be a layering: no two packages may import each other"


def test_packages_import_only_the_layers_they_are_allowed():
    violations = []
    for module in sorted(GRAPH):
        statements, strings = GRAPH[module]
        source = package_of(module)
        for target in sorted(statements | strings):
            dest = package_of(target)
            if dest != source and dest not in ALLOWED[source]:
                how = "names" if target in strings else "imports"
                violations.append(f"{module} {how} {target} ({source} -> {dest})")
    assert not violations, "layering violations:\n" + "\n".join(violations)


def test_layers_follow_the_pipeline():
    """What the table says, spelled out: nothing below the trainers reaches them, the doctrine
    tools never train, the math does not reach rewards, and the data layer depends on nothing but
    the error contract."""
    below_algorithms = [p for p, deps in ALLOWED.items() if p not in ("algorithms", "commands", "cli", "__main__")]
    assert all("algorithms" not in ALLOWED[p] and "commands" not in ALLOWED[p] for p in below_algorithms)
    assert "rewards" not in ALLOWED["objectives"] and "rlaif" not in ALLOWED["objectives"]
    assert "rewards" not in ALLOWED["rlaif"]
    assert ALLOWED["data"] == {"errors"} and ALLOWED["models"] == {"errors"}
    assert "doctrine" in ALLOWED["algorithms"]


if __name__ == "__main__":  # print the package graph as the code has it
    seen = defaultdict(set)
    for module, (statements, strings) in GRAPH.items():
        for target in statements | strings:
            if package_of(target) != package_of(module):
                seen[package_of(module)].add(package_of(target))
    for package in ALLOWED:
        print(f"{package:11} -> {', '.join(sorted(seen[package])) or '-'}")
