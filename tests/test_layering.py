"""Imports across layers use the public names of the package ``__init__``s.

Inside ``isopace.flow``, ``isopace.store`` and ``isopace.net``, a name another layer re-exports
from its package (``isopace.iso8583.Iso8583Error``) is imported from the package, not from the
module that defines it (``isopace.iso8583.errors``): the package is the contract, its modules are
free to move."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import isopace

LAYERS = ("iso8583", "flow", "store", "net")
SRC = Path(isopace.__file__).parent


@pytest.mark.parametrize("layer", ["flow", "store", "net"])
def test_cross_layer_imports_use_package_reexports(layer: str) -> None:
    found = []
    for path in sorted((SRC / layer).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or node.module is None:
                continue
            parts = node.module.split(".")
            if len(parts) < 3 or parts[0] != "isopace" or parts[1] not in LAYERS:
                continue
            if parts[1] == layer:
                continue  # a package's own modules import each other directly
            public = set(getattr(importlib.import_module(f"isopace.{parts[1]}"), "__all__", ()))
            for alias in node.names:
                if alias.name in public:
                    found.append(f"{path.name}:{node.lineno}: {alias.name} from {node.module}")
    assert not found, found


# --- the import graph: no circle, layers only downward, no reaching into another module's privates

#: which packages of ``isopace`` a package may import (DESIGN.md, "Layers"); the top-level modules
#: (``isopace``, ``isopace._cardtext``, ``isopace.errors``) are below every package.
ALLOWED = {
    "iso8583": set(),
    "flow": {"iso8583"},
    "store": {"iso8583", "flow"},
    "net": {"iso8583"},
    "host": {"iso8583", "flow", "store", "net"},
    "cli": {"iso8583", "flow", "store", "net", "host"},
}
#: the public methods of ``namedtuple`` start with an underscore so as not to clash with fields
NAMEDTUPLE_API = {"_make", "_replace", "_asdict", "_fields", "_field_defaults"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """The nodes under ``if TYPE_CHECKING:``: imports for annotations only, never executed."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids.update(id(n) for n in ast.walk(node))
    return ids


def _import_graph() -> dict[str, set[str]]:
    """Module -> the ``isopace`` modules it imports, wherever the import is written (an import
    inside a function is an edge as much as a top-level one), except those for type checking."""
    modules = _modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_nodes(tree)
        targets: set[str | None] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets.update(owner(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}" if base else package
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in modules else owner(base))
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
                    circles.append(sorted(component))
    return circles


def test_circle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_src() -> None:
    assert _circles(_import_graph()) == []


def test_layers_import_only_downward() -> None:
    wrong = []
    for module, targets in _import_graph().items():
        parts = module.split(".")
        if len(parts) < 3 and module not in {f"isopace.{p}" for p in ALLOWED}:
            continue  # a top-level module
        layer = parts[1]
        for target in targets:
            tparts = target.split(".")
            if len(tparts) < 2 or tparts[1] not in ALLOWED or tparts[1] == layer:
                continue
            if tparts[1] not in ALLOWED[layer]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def _own_names(tree: ast.AST) -> set[str]:
    """The names a module defines: its functions, classes, globals, the attributes it assigns on
    ``self``/``cls`` and its ``__slots__`` strings. Reading ``x._name`` is private access across
    modules when ``_name`` is none of them."""
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            own.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in {"self", "cls"}
        ):
            own.add(node.attr)
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
        ):
            own.update(
                n.value
                for n in ast.walk(node.value)
                if isinstance(n, ast.Constant) and isinstance(n.value, str)
            )
    return own


def test_no_module_reaches_into_another_modules_privates() -> None:
    found = []
    for name, path in sorted(_modules().items()):
        tree = ast.parse(path.read_text(), str(path))
        own = _own_names(tree) | NAMEDTUPLE_API
        package = name.split(".")[1] if name.count(".") else ""
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                attr = node.attr
                if not attr.startswith("_") or attr.startswith("__") or attr in own:
                    continue
                if isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"}:
                    continue
                found.append(f"{name}: {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("isopace."):
                parts = node.module.split(".")  # type: ignore[union-attr]
                if parts[1] == package:
                    continue  # a package's modules share its private names
                for alias in node.names:
                    if alias.name.startswith("_"):
                        found.append(f"{name}: {alias.name} from {node.module}")
    assert found == [], "a module reads another module's private names"
