"""Keep the checkout's `kernels/` folder from hiding the Hub's `kernels` package from transformers.

Why: from transformers 5.25 on, transformers requires the Hugging Face `kernels` distribution and
runs `from kernels import ...` whenever its modeling code loads. This project keeps its own
kernels in a top-level `kernels/` folder (installed as `dbtrimkv.kernels`). When the root of a
checkout is on `sys.path` (`python -m pytest`, `python -m dbtrimkv`, `python -c ...` run there),
`import kernels` finds that folder first and transformers fails to import ("cannot import name
'CUDAProperties' from 'kernels'").

What: a meta path finder, installed once before anything imports transformers, that resolves the
top-level name `kernels` on `sys.path` without the checkout roots (folders holding both `dbtrimkv/`
and `kernels/`). Where no other `kernels` is installed it finds nothing and the ordinary import
runs, so nothing changes on transformers releases that do not need the Hub package. Our own
kernels are always imported as `dbtrimkv.kernels` and are not affected. Standard library only,
so it costs nothing at import time.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

_NAME = "kernels"


def _is_checkout_root(entry: str) -> bool:
    """A `sys.path` entry ("" is the working directory) that holds this project's `kernels/` folder."""
    folder = entry or os.getcwd()
    return os.path.isdir(os.path.join(folder, "dbtrimkv")) and os.path.isfile(
        os.path.join(folder, _NAME, "__init__.py"))


class _InstalledKernelsFinder(importlib.abc.MetaPathFinder):
    """Finds the top-level `kernels` package anywhere on `sys.path` except in a dbtrimkv checkout."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _NAME:
            return None
        entries = [entry for entry in sys.path if isinstance(entry, str) and not _is_checkout_root(entry)]
        return importlib.machinery.PathFinder.find_spec(fullname, entries)


def ensure_hub_kernels_importable() -> bool:
    """Install the finder (once). Returns True if it did."""
    if any(isinstance(finder, _InstalledKernelsFinder) for finder in sys.meta_path):
        return False
    sys.meta_path.insert(0, _InstalledKernelsFinder())
    return True
