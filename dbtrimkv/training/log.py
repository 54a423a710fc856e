"""Per-step training metrics: one JSON line per logged step, and a short console line.

Why: a run must be inspectable while it runs (console) and afterwards (`train_log.jsonl`, one
object per line: step, loss, kl, ntp, capacity, mass_ratio = mean S_t / M, lr, grad_norm, tokens,
seconds per step). Resuming appends to the same file.
"""

from __future__ import annotations

import json
from pathlib import Path

LOG_FILE = "train_log.jsonl"


class MetricsLog:
    def __init__(self, output_dir: str | Path, max_steps: int, append: bool = False):
        self.path = Path(output_dir) / LOG_FILE
        self.max_steps = max_steps
        self._file = open(self.path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        print(
            f"step {record['step']}/{self.max_steps} | loss {record['loss']:.4f} | kl {record['kl']:.4f} | "
            f"ntp {record['ntp']:.4f} | capacity {record['capacity']:.4f} | S/M {record['mass_ratio']:.3f} | "
            f"lr {record['lr']:.2e} | {record['seconds']:.2f} s/step",
            flush=True,
        )

    def close(self) -> None:
        self._file.close()
