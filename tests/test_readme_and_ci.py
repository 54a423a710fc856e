"""`.ci/run` runs the README's install line and test line verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_commands_verbatim():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    install, test = blocks[0], blocks[1]
    assert install.startswith("pip install") and "\n" not in install
    assert "pytest" in test and "\n" not in test
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install in ci_lines
    assert test in ci_lines
    assert ci_lines.index(install) < ci_lines.index(test)


def test_kernels_is_not_installed_as_a_top_level_module():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"dbtrimkv.kernels" = "kernels"' in pyproject
    assert not re.search(r'^packages\s*=.*"kernels"', pyproject, flags=re.M)


def test_every_subpackage_is_installed():
    """pyproject lists packages explicitly (package-dir maps kernels/, configs/, demos/ into dbtrimkv)."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    dirs = {name: ROOT / path for name, path in setuptools["package-dir"].items()}
    found = set()
    for name, directory in dirs.items():
        for init in directory.rglob("__init__.py"):
            rel = init.parent.relative_to(directory).parts
            found.add(".".join((name, *rel)) if rel else name)
    assert found == listed


def test_readme_main_command_answers_cleanly():
    """The third README command, as a new user runs it: the answer, and no warning or traceback."""
    import os
    import shlex
    import subprocess
    import sys

    command = _bash_blocks((ROOT / "README.md").read_text())[2]
    args = shlex.split(command)
    assert args[:2] == ["dbtrimkv", "chat"] and "\n" not in command
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="")
    result = subprocess.run([sys.executable, "-m", "dbtrimkv.cli", *args[1:]], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "image:7"
    for noise in ("Warning", "warning", "Traceback", "deprecated", "Loading weights"):
        assert noise not in result.stderr, result.stderr
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```\nKV cache: ") + 4  # the README's copy of what the command prints about the cache
    shown = readme[start : readme.index("```", start)].strip().splitlines()
    printed = result.stderr.splitlines()
    assert shown == printed[printed.index(shown[0]) : printed.index(shown[0]) + len(shown)]


def test_readme_states_the_supported_transformers_range():
    from dbtrimkv.modeling.transformers_compat import NEWEST_TESTED, OLDEST_SUPPORTED, supported_range

    readme = (ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines() if "Supported transformers" in line)
    assert f"**{OLDEST_SUPPORTED} to {NEWEST_TESTED}**" in line and f"`{supported_range()}`" in line


def test_ci_reruns_the_oldest_supported_transformers():
    from dbtrimkv.modeling.transformers_compat import OLDEST_SUPPORTED

    run = (ROOT / ".ci" / "run").read_text()
    assert "OLDEST_SUPPORTED" in run and 'transformers==$oldest.*' in run
    assert OLDEST_SUPPORTED == "5.17"
    for folder in ("tests/engine", "tests/training", "tests/test_pipeline.py"):
        assert folder in run


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_readme_python_imports_work():
    """Every import line of the Python snippets in the README and docs runs as written (the snippets
    themselves need hub models; their imports must not be what breaks)."""
    lines = [line.strip() for doc in DOCS for block in _python_blocks(doc.read_text()) for line in block.splitlines()
             if re.match(r"\s*(from dbtrimkv[\w.]* import |import dbtrimkv)", line)]
    assert lines
    for line in lines:
        exec(line, {})  # noqa: S102 - the README's own import lines


def test_the_dotted_names_the_readme_gives_exist():
    """`dbtrimkv.a.b` names in the README's and the docs' text point at real modules, classes and functions."""
    import importlib

    names = {name for doc in DOCS for name in re.findall(r"`(dbtrimkv(?:\.\w+)+)", doc.read_text())}
    names -= {"dbtrimkv.notice"}  # a field of the server's JSON responses, not a Python name
    assert len(names) > 5
    for name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ModuleNotFoundError:
                continue
        for attr in parts[cut:]:
            assert hasattr(obj, attr), f"README names {name}: {'.'.join(parts[:cut])} has no {attr}"
            obj = getattr(obj, attr)


def test_subpackages_load_on_first_use():
    """After a plain `import dbtrimkv`, `dbtrimkv.cache.save_cache(...)` works (PEP 562), and the import stays
    light until a subpackage is used."""
    import subprocess
    import sys

    code = ("import sys, dbtrimkv; light = 'torch' not in sys.modules; "
            "print(light, dbtrimkv.cache.save_cache.__name__, dbtrimkv.video_qa.VideoQA.__name__, "
            "hasattr(dbtrimkv, 'no_such_thing'), hasattr(dbtrimkv, '_private'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert out.stdout.split() == ["True", "save_cache", "VideoQA", "False", "False"], out.stderr[-2000:]
