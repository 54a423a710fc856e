"""What a bug report needs: the versions of the libraries dbtrimkv hooks, and what the machine can run.

Why: most failures of an engine that hooks transformers internals come from a version mismatch or a
missing accelerator. `dbtrimkv --version` prints this report without loading a model (and without
importing the heavy optional libraries: their versions come from the installed metadata).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

import torch

from . import __version__
from .modeling.transformers_compat import installed_version, is_supported, supported_range

REPORTED_PACKAGES = ("torch", "transformers", "triton", "accelerate", "gradio")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cuda_status() -> str:
    if not torch.cuda.is_available():
        return "no (CPU only)" if torch.version.cuda is None else f"no device visible (torch built for CUDA {torch.version.cuda})"
    name = torch.cuda.get_device_name(0)
    return f"yes: {torch.cuda.device_count()} x {name} (CUDA {torch.version.cuda})"


def triton_kernels_status() -> str:
    """The Triton kernels run on CUDA tensors; on CPU the torch references run instead."""
    if importlib.util.find_spec("triton") is None:
        return "no: triton is not installed (the torch reference kernels run instead)"
    if not torch.cuda.is_available():
        return "no: no CUDA device (the torch reference kernels run instead)"
    return "yes"


def version_report() -> str:
    lines = [f"dbtrimkv {__version__}", f"python {platform.python_version()} ({platform.platform()})"]
    for name in REPORTED_PACKAGES:
        version = package_version(name)
        note = ""
        if name == "transformers":
            version = installed_version()
            note = f" (supported: {supported_range()}{'' if is_supported() else '; NOT SUPPORTED'})"
        lines.append(f"{name} {version or 'not installed'}{note}")
    lines.append(f"CUDA usable: {cuda_status()}")
    lines.append(f"Triton kernels usable: {triton_kernels_status()}")
    return "\n".join(lines)
