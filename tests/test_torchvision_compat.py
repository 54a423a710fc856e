"""After `import dbtrimkv`, the CUDA-built torchvision imports on a CPU torch (the shim runs just before
torchvision is first imported, `dbtrimkv._import_hooks`), and the shim acts only when needed."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_processor_classes_import_after_dbtrimkv():
    result = _python(
        "import dbtrimkv, torchvision\n"
        "from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor, Qwen2VLImageProcessor\n"
        "print('ok')"
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_shim_acts_only_when_torchvision_ops_fail_to_load():
    probe = _python(
        "from pathlib import Path; import importlib.util, torch\n"
        "spec = importlib.util.find_spec('torchvision')\n"
        "from dbtrimkv._torchvision_compat import _ops_library_loads\n"
        "print(_ops_library_loads(Path(list(spec.submodule_search_locations)[0])))"
    )
    assert probe.returncode == 0, probe.stderr
    ops_load = probe.stdout.strip().endswith("True")
    result = _python(
        "import dbtrimkv, torchvision\n"  # the first import of torchvision after dbtrimkv runs the shim
        "import dbtrimkv._torchvision_compat as compat\n"
        "print(compat._library is not None); print(compat.ensure_torchvision_importable())"
    )
    assert result.returncode == 0, result.stderr
    declared, again = result.stdout.split()
    assert declared == str(not ops_load) and again == "False"  # acts at most once
    if not ops_load:
        plain = _python("import torchvision")
        if plain.returncode == 0:
            pytest.skip("this torchvision imports on its own")
        assert "torchvision::nms" in plain.stderr
