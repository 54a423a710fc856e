"""The package's import graph has no cycles, and function-local imports are only for heavy optional
dependencies.

Why: a cycle hidden behind function-local imports makes the load order fragile and the layering
unreadable (which module builds on which). The graph is read with `ast` from the source files, module-level
and function-level imports alike, the command line's deferred `lazy("dbtrimkv.x")` imports, and the
imports of `if TYPE_CHECKING:` blocks too: they never run, but a cycle closed through type-only imports
is the same tangle of layers (issue 25).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"dbtrimkv": ROOT / "dbtrimkv", "dbtrimkv.kernels": ROOT / "kernels"}
# Heavy or optional dependencies, imported only where used: the demo's UI and plots, video decoding,
# parquet datasets (video QA), multi-device training, hub downloads, progress bars, FlexAttention
# (newer torch only), and the Triton kernels (CUDA only; see `_is_lazy_kernel`).
LAZY_ALLOWED = {"gradio", "matplotlib", "av", "pandas", "accelerate", "huggingface_hub", "tqdm",
                "torch.nn.attention.flex_attention", "psutil", "httpx",  # the last two: serving only
                "ray", "dbtrimkv.serving.ray_app"}  # the optional extra `.[ray]` (serve --replicas) and its user


def _lazy_allowed(name: str) -> bool:
    return any(name == lazy or name.startswith(lazy + ".") for lazy in LAZY_ALLOWED) or _is_lazy_kernel(name)


def _is_lazy_kernel(name: str) -> bool:
    return name.startswith("dbtrimkv.kernels.") and name.endswith(".triton_kernel")


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _is_lazy_import(node) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "lazy"
            and len(node.args) == 1 and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))


def _imports(module: str, path: Path, known: set[str]):
    """(imported module, line, inside a function) for every import statement, type-only ones included."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((alias.name, child.lineno, in_function))
            elif _is_lazy_import(child):  # `x = lazy("dbtrimkv.x")` (commands/lazy.py): an import, run later
                found.append((child.args[0].value, child.lineno, False))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module
                for alias in child.names:  # `from . import x` may name a submodule
                    sub = f"{target}.{alias.name}"
                    found.append((sub if sub in known else target, child.lineno, in_function))
            visit(child, local)

    visit(tree, False)
    return found


def _resolve(name: str, known: set[str]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _graph():
    modules = _modules()
    known = set(modules)
    graph, lazy = {}, []
    for module, path in modules.items():
        edges = set()
        for name, line, in_function in _imports(module, path, known):
            target = _resolve(name, known)
            if in_function and not _lazy_allowed(name):
                lazy.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
            if target is None or target == module:
                continue
            edges.add(target)
            # importing a.b.c runs the __init__ of a and a.b first
            parent = target.rpartition(".")[0]
            while parent and parent in known and not module.startswith(parent + ".") and parent != module:
                edges.add(parent)
                parent = parent.rpartition(".")[0]
        graph[module] = edges
    return graph, lazy


def _find_cycle(graph):
    state, stack = {}, []

    def dfs(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    graph, _ = _graph()
    assert len(graph) > 50  # the walk found the package
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_server_does_not_import_the_user_facing_pipeline():
    """The server builds on the engine's modules, not on `pipeline.py` (issue 25: shared helpers live
    in their own modules, e.g. `inputs/turns.py`, `reporting/stats_text.py`)."""
    graph, _ = _graph()
    serving = [m for m in graph if m == "dbtrimkv.serving" or m.startswith("dbtrimkv.serving.")]
    assert len(serving) > 10
    assert [m for m in serving if "dbtrimkv.pipeline" in graph[m]] == []


def test_function_local_imports_only_for_heavy_optional_dependencies():
    _, lazy = _graph()
    assert not lazy, "function-local imports (move them to the top of the module):\n" + "\n".join(lazy)


def test_the_walk_sees_cycles_and_local_imports(tmp_path, monkeypatch):
    """The checker itself: a two-module cycle through a function-local import is reported."""
    pkg = tmp_path / "dbtrimkv"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "c.py").write_text("x = lazy('dbtrimkv.b')\n")
    monkeypatch.setitem(PACKAGES, "dbtrimkv", pkg)
    monkeypatch.delitem(PACKAGES, "dbtrimkv.kernels")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path, raising=False)
    graph, lazy = _graph()
    assert _find_cycle(graph) in (["dbtrimkv.a", "dbtrimkv.b", "dbtrimkv.a"], ["dbtrimkv.b", "dbtrimkv.a", "dbtrimkv.b"])
    assert lazy == ["dbtrimkv/b.py:2 imports dbtrimkv.a"]
    assert graph["dbtrimkv.c"] == {"dbtrimkv.b"}  # a deferred `lazy(...)` import is an edge too


def test_the_walk_counts_type_checking_imports(tmp_path, monkeypatch):
    """A cycle closed only through an `if TYPE_CHECKING:` import is still a cycle."""
    pkg = tmp_path / "dbtrimkv"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import g\ndef f(): ...\n")
    monkeypatch.setitem(PACKAGES, "dbtrimkv", pkg)
    monkeypatch.delitem(PACKAGES, "dbtrimkv.kernels")
    graph, lazy = _graph()
    assert _find_cycle(graph) in (["dbtrimkv.a", "dbtrimkv.b", "dbtrimkv.a"], ["dbtrimkv.b", "dbtrimkv.a", "dbtrimkv.b"])
    assert lazy == []
