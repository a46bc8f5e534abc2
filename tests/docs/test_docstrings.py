"""The ``>>>`` examples in the package's docstrings run, as ``help()`` shows them to a reader
(``help(isopace.flow)`` starts with one): every module whose source has one is run through
doctest, and each must run at least one example and fail none."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

import isopace

SRC = Path(isopace.__file__).parent


def _modules_with_examples() -> list[str]:
    names = []
    for path in sorted(SRC.rglob("*.py")):
        if ">>> " not in path.read_text():
            continue
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def test_the_flow_package_opens_with_an_example() -> None:
    assert "isopace.flow" in _modules_with_examples()


@pytest.mark.parametrize("name", _modules_with_examples())
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
