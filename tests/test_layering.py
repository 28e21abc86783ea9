"""The import graph of peft_lab and merging: no cycles, and the layering the design promises
(tree <- kernels <- adapters <- train; merging on top; peft_lab never imports merging except through the CLI's
dispatch by module name). Every import counts, at module level or inside a function, except under
`if TYPE_CHECKING:`. `make lint` runs this file too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("peft_lab", "merging")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", "")
            if name == "TYPE_CHECKING":
                skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (`from pkg import name` counts as `pkg.name` when that is a module)."""
    files = {_module_name(p): p for top in PACKAGES for p in (REPO / top).rglob("*.py") if "__pycache__" not in p.parts}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                for a in node.names:
                    deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base)
        own = {d for d in deps if d in files and d != mod}
        # a package's __init__ re-exporting its own submodules is not a dependency of them on it
        graph[mod] = {d for d in own if not (path.name == "__init__.py" and d.startswith(mod + "."))}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


# (importer prefix, forbidden prefixes): the layers of docs/design.md
RULES = [
    ("peft_lab.tree", ("peft_lab.kernels", "peft_lab.adapters", "peft_lab.train", "peft_lab.data", "merging")),
    ("peft_lab.kernels", ("peft_lab.adapters", "peft_lab.train", "merging")),
    ("peft_lab.adapters", ("peft_lab.train", "merging")),
    ("peft_lab", ("merging",)),
]


@pytest.mark.parametrize("importer,forbidden", RULES, ids=[r[0] for r in RULES])
def test_layers_import_one_way(importer, forbidden):
    bad = [
        f"{m} -> {d}"
        for m, deps in import_graph().items()
        if m == importer or m.startswith(importer + ".")
        for d in deps
        if any(d == f or d.startswith(f + ".") for f in forbidden)
    ]
    assert not bad, "imports against the layering: " + ", ".join(sorted(bad))


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
