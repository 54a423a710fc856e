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
    """Calls `before()` just before module `name` is first looked up for import and `after()` right after
    it has executed. A lookup alone (`importlib.util.find_spec`) may run `before` early, which is
    harmless; `after` waits for the module to really execute, and only then the hook goes away."""

    def __init__(self, name: str, before: Callable[[], object] | None = None,
                 after: Callable[[], object] | None = None):
        self.name, self.before, self.after = name, before, after
        self._busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or self._busy:
            return None
        self._busy = True  # the lookup below asks every finder again, this one included
        try:
            if self.before is not None:
                before, self.before = self.before, None
                before()
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if self.after is None:
            _remove(self)
        elif spec is not None and spec.loader is not None:
            spec.loader = _RunAfter(spec.loader, self)
        return spec


class _RunAfter(importlib.abc.Loader):
    """Delegates to the real loader; once the module has executed, removes the hook and calls its `after()`."""

    def __init__(self, loader, hook: _Hook):
        self.loader, self.hook = loader, hook

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        if self.hook in sys.meta_path:
            _remove(self.hook)
            self.hook.after()


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
