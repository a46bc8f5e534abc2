"""Your own stages inside the shipped host: ``--extension MODULE:FUNCTION`` or ``FILE.py:FUNCTION``.

Why: the host's flow (`isopace.host.build_flow`) is the product most users start from, and the
usual first change is one more check (a fraud rule, a merchant block list, a field a network
requires) rather than a new host. Rebuilding the whole flow for that would mean copying it and
falling behind every release; an extension adds to the flow the host builds instead.

``FUNCTION(flow, ledger, config)`` is called once at start-up, after the host has built its flow
and before recovery and serving, with the `isopace.flow.Flow`, the host's `Ledger` and its
`HostConfig`. It adds stages with ``flow.group(name, *stages)``, which appends them to a group:

- to ``"authorize"``: they run for every 0100/0200 after the risk and transaction-type stages and
  before the network group's ``reserve`` (the transaction-type stage routes to the network
  group, and a routed group's stages come after the rest of the current group), so a stage there
  can decline (`isopace.host.stages.decline`) before any money is held;
- to ``"main"``: after parse and dispatch, for every request; to ``"respond"``: last, with the
  response built.

What a stage may rely on is what the host's own stages use: ``ex.get("card")`` (the card the risk
stage found), ``ex.get("amount")`` (DE 4 in minor units, after conversion). An extension stage
with a ``recover(ex, committing)`` method is recovered like the host's own: ``isopace recover``
and the start-up recovery load the same extensions, so a stage that holds or posts something
can finish or undo it after a crash.

Decided: MODULE is imported by name, with the current directory first on the import path while
it loads (a file ``mystage.py`` in the directory the host starts in works, as does an installed
package); ``PATH.py:FUNCTION`` imports that file (relative to the current directory), for a
stage kept beside the configuration rather than on the import path.
Extensions run in the order given. A module that does not import, a name that is not a callable
in it, or a function that raises stops the start with one line naming the extension
(`StartupError`): a host that silently ran without its fraud check would be worse than one that
does not start.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from isopace.host.errors import ConfigError, StartupError, one_line

if TYPE_CHECKING:
    from isopace.flow import Flow
    from isopace.host.config import HostConfig
    from isopace.host.ledger import Ledger

__all__ = ["Extension", "apply_extensions", "check_extension", "load_extension"]

#: ``FUNCTION(flow, ledger, config)``
Extension = Callable[["Flow", "Ledger", "HostConfig"], Any]


def check_extension(text: str) -> tuple[str, str]:
    """``MODULE:FUNCTION`` (or ``PATH.py:FUNCTION``) split, or ConfigError naming what is wrong."""
    module, sep, function = text.rpartition(":")
    names = [function] if module.endswith(".py") else [*module.split("."), function]
    if not sep or not module or not all(n.isidentifier() for n in names):
        raise ConfigError(
            f"extension {text!r}: expected MODULE:FUNCTION or FILE.py:FUNCTION (mystage:extend)"
        )
    return module, function


def _import(module_name: str) -> ModuleType:
    if module_name.endswith(".py"):  # a file: imported under its stem, as `python FILE` would
        path = os.path.abspath(module_name)
        stem = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(stem, path)
        if spec is None or spec.loader is None or not os.path.isfile(path):
            raise FileNotFoundError(f"no file {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[stem] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[stem]
            raise
        return module
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    finally:
        if added:
            sys.path.remove(cwd)


def load_extension(text: str) -> Extension:
    """The function ``text`` names (see the module notes for where it is looked for)."""
    module_name, function = check_extension(text)
    try:
        module = _import(module_name)
    except Exception as exc:
        reason = f"cannot import {module_name}: {one_line(exc)}"
        raise StartupError(f"extension {text}: {reason}") from exc
    found = getattr(module, function, None)
    if not callable(found):
        raise StartupError(f"extension {text}: {module_name} has no function {function}")
    extension: Extension = found
    return extension


def apply_extensions(flow: Flow, ledger: Ledger, config: HostConfig) -> None:
    """Load and call every ``config.extensions``, in order (see the module notes)."""
    for text in config.extensions:
        extension = load_extension(text)
        try:
            extension(flow, ledger, config)
        except Exception as exc:
            raise StartupError(f"extension {text}: failed: {one_line(exc)}") from exc
