"""`python -m dbtrimkv.lmms ARGS`: lmms-eval's own command line (`lmms-eval ARGS`), dbtrimkv imported first.

Why: on a CPU-only torch next to PyPI's CUDA-built torchvision, `import torchvision` crashes, and
lmms-eval imports it (through transformers) before it loads any model; importing dbtrimkv first
applies its guard (`dbtrimkv._torchvision_compat`). Where torchvision works, plain `lmms-eval`
is the same run.
"""

from __future__ import annotations

import sys

import dbtrimkv  # noqa: F401  (before lmms-eval: makes torchvision importable on a CPU-only torch)
from lmms_eval.cli.dispatch import main

if __name__ == "__main__":
    sys.exit(main())
