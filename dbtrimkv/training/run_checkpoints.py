"""Training checkpoints: save and resume without pickling anything.

Why: a long run must survive interruption and continue exactly where it stopped (same step, same
learning rate, same optimizer moments, same data order, same random state), and a checkpoint must
be safe to open: tensors go to safetensors, everything else to JSON; nothing is unpickled.

A checkpoint directory `output_dir/checkpoints/step-0000050/` holds
- the gates in the `save_gates` format (so `dbtrimkv.load_model(checkpoint)` works on it too),
- `optimizer.safetensors` (AdamW moments) and `trainer_state.json` (step, config, scheduler state,
  optimizer hyper-parameters),
- `rng-rank{N}.safetensors` / `rng-rank{N}.json`: every process's torch, CUDA, Python and NumPy
  random state.
It is written to `step-*.tmp` and renamed when complete, so a crash never leaves half a checkpoint
that `--resume` would pick up.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..loading.checkpoints import GATES_WEIGHTS, load_gate_state, save_gates
from ..errors import CheckpointError

STATE_JSON = "trainer_state.json"
OPTIMIZER_WEIGHTS = "optimizer.safetensors"
FORMAT = "dbtrimkv-train-state"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:07d}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = sorted(p for p in (Path(output_dir) / "checkpoints").glob("step-*")
                   if p.suffix != ".tmp" and (p / STATE_JSON).is_file())
    return found[-1] if found else None


def write_main_state(directory: Path, model, optimizer, scheduler, step: int, config: dict,
                     base_model: str, eviction) -> None:
    """The shared part (main process only): gates, optimizer, scheduler, step, config."""
    save_gates(model, directory, eviction=eviction, base_model=base_model)
    state = optimizer.state_dict()
    tensors = {f"{index}.{name}": value.detach().cpu().contiguous().clone()
               for index, entries in state["state"].items() for name, value in entries.items()}
    save_file(tensors, str(directory / OPTIMIZER_WEIGHTS))
    meta = {"format": FORMAT, "version": 1, "step": step, "config": config,
            "scheduler": scheduler.state_dict(), "optimizer_param_groups": state["param_groups"]}
    (directory / STATE_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def write_rng_state(directory: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(directory / f"rng-rank{rank}.safetensors"))
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py = {"python": [version, list(mt), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    (directory / f"rng-rank{rank}.json").write_text(json.dumps(py) + "\n")


def finalize(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def read_state(directory: str | Path) -> dict:
    path = Path(directory) / STATE_JSON
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot resume from {directory}: {path.name} is missing or unreadable ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dbtrimkv training state")
    return meta


def load_training_state(directory: str | Path, model, optimizer, scheduler, rank: int) -> int:
    """Restore gates, optimizer, scheduler and this process's random state; returns the step."""
    directory = Path(directory)
    meta = read_state(directory)
    load_gate_state(model, load_file(str(directory / GATES_WEIGHTS)), source=str(directory))
    entries: dict[int, dict] = {}
    for key, value in load_file(str(directory / OPTIMIZER_WEIGHTS)).items():
        index, name = key.split(".", 1)
        entries.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": entries, "param_groups": meta["optimizer_param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    rng_file = directory / f"rng-rank{rank}.safetensors"
    if rng_file.is_file():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["torch"])
        cuda = [rng[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in rng]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
        py = json.loads((directory / f"rng-rank{rank}.json").read_text())
        version, mt, gauss = py["python"]
        random.setstate((version, tuple(mt), gauss))
        kind, keys, pos, has_gauss, cached = py["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return int(meta["step"])
