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
