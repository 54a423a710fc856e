"""Small modules with one job each: no module over 400 lines and no class over 250 in dbtrimkv/.

Why: issue 25 set these limits so that no file grows back into an engine of its own; this test holds
them (the line counts are physical lines, docstrings and comments included).
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dbtrimkv"
MODULE_LINES, CLASS_LINES = 400, 250


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MODULE_LINES}
    assert not long, f"modules over {MODULE_LINES} lines: {long}"


def test_no_class_over_250_lines():
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > CLASS_LINES:
                    long[f"{path.relative_to(PACKAGE)}:{node.name}"] = node.end_lineno - start + 1
    assert not long, f"classes over {CLASS_LINES} lines: {long}"


def test_the_limits_see_the_package():
    assert len(_modules()) > 100  # the scan reads the real package, so an empty glob cannot pass
