"""Run dbtrimkv's set-up code when the libraries it concerns are imported, not when dbtrimkv is.

Why: `import dbtrimkv` (and so `dbtrimkv --help`) must not pay for torch and transformers (seconds),
yet two things must still happen at the right moment for anyone who imported dbtrimkv first:
- the torchvision shim (`_torchvision_compat`) must run just *before* torchvision is first
  imported (transformers' image processors import it);
- the `transformers.pipeline("dbtrimkv-image-text-to-text")` task must be registered once
  `transformers.pipelines` exists, before the user can call `pipeline(...)`.
A `sys.meta_path` finder watches for the one module name, runs the action once (before the import,
or right after the module has executed) and removes itself; it never changes what is imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable


class _Hook(importlib.abc.MetaPathFinder):
    """Calls `before()` just before module `name` is first imported and `after()` right after."""

    def __init__(self, name: str, before: Callable[[], object] | None = None,
                 after: Callable[[], object] | None = None):
        self.name, self.before, self.after = name, before, after

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        _remove(self)
        if self.before is not None:
            self.before()
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and self.after is not None:
            spec.loader = _RunAfter(spec.loader, self.after)
        return spec


class _RunAfter(importlib.abc.Loader):
    """Delegates to the real loader, then calls `after()` once the module has executed."""

    def __init__(self, loader, after: Callable[[], object]):
        self.loader, self.after = loader, after

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.after()


def _remove(hook: _Hook) -> None:
    if hook in sys.meta_path:
        sys.meta_path.remove(hook)


def when_imported(name: str, before: Callable[[], object] | None = None,
                  after: Callable[[], object] | None = None) -> None:
    """Run `before` / `after` around the first import of `name`; at once if it is already imported."""
    if name in sys.modules:
        if after is not None:
            after()
        return
    sys.meta_path.insert(0, _Hook(name, before, after))


def _shim_torchvision() -> None:
    importlib.import_module("dbtrimkv._torchvision_compat").ensure_torchvision_importable()


def _register_pipeline_task() -> None:
    importlib.import_module("dbtrimkv.hf_pipeline").register()


def install() -> None:
    """The torchvision shim before torchvision, the pipeline task after `transformers.pipelines`."""
    when_imported("torchvision", before=_shim_torchvision)
    when_imported("transformers.pipelines", after=_register_pipeline_task)
