"""`import dbtrimkv` keeps the checkout's `kernels/` folder from hiding an installed top-level `kernels` package
(transformers >= 5.25 imports the Hub's `kernels` whenever its modeling code loads)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_an_installed_kernels_package_wins_over_the_checkout_folder(tmp_path):
    installed = tmp_path / "site" / "kernels"  # last on sys.path: a Hub `kernels` already installed comes first
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.append({str(tmp_path / 'site')!r})\n"
            "import importlib.machinery as m\n"
            f"other = m.PathFinder.find_spec('kernels', [p for p in sys.path if p != {str(ROOT)!r}]).origin\n"
            "import dbtrimkv, kernels; print(kernels.__file__, other)\n"
            "import dbtrimkv.kernels as own; print(own.__file__)")
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    found, other, own = result.stdout.split()
    assert found == other and Path(found) != ROOT / "kernels" / "__init__.py"
    assert Path(own) == ROOT / "kernels" / "__init__.py"


def test_without_another_kernels_package_nothing_changes(tmp_path):
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "import dbtrimkv, importlib.util; spec = importlib.util.find_spec('kernels')\n"
            "import importlib.metadata as md\n"
            "try: md.distribution('kernels'); print('hub')\n"
            "except md.PackageNotFoundError: print(spec.origin)")
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout.strip()
    assert out == "hub" or Path(out) == ROOT / "kernels" / "__init__.py"


def test_transformers_modeling_imports_from_the_checkout_root():
    result = _python("import dbtrimkv\nfrom transformers import AttentionInterface, PreTrainedModel\nprint('ok')", ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
