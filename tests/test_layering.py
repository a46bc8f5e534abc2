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
