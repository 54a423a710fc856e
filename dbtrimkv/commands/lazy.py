"""`lazy("dbtrimkv.x")`: a module the command line imports only when a command first uses it.

Why: building the parser (and so `dbtrimkv --help` or a mistyped flag) must not import torch or
transformers, which take seconds; the engine modules import both at their top. A command module
names the engine modules it runs with `x = lazy("dbtrimkv.x")` and uses `x.name` inside its `run`:
the import happens on the first attribute access, after the arguments were parsed and checked.
`tests/test_import_graph.py` counts these as imports, so they stay visible to the cycle check.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class lazy:  # noqa: N801 - reads like the import it stands for
    """A stand-in for module `name`: attribute access imports it (once) and reads from it."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str):
        self._name, self._module = name, None

    def _load(self) -> ModuleType:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return self._module

    def __getattr__(self, attribute: str):
        return getattr(self._load(), attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}{' (loaded)' if self._module is not None else ''}>"
