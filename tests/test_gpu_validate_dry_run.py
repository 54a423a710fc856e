"""bench/gpu_validate.sh is complete and runs: its dry run (CPU-safe steps at tiny sizes, torch paths)
exits 0 and its report evaluates every check of issue 16's targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = {"tests_kernels", "tests_flex", "tests_real_shapes", "select kernel vs top-k loop",
          "decode attention vs copy bandwidth (>= 64k entries/layer)", "eviction share of decode time",
          "gate share of decode time"}


def test_gpu_validate_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_validate.sh"), "--dry-run", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    names = {c["check"] for c in summary["checks"]}
    assert CHECKS <= names and any(n.startswith("decode vs hf full (batch 2") for n in names)
    assert summary["dry_run"] is True
    assert all(c["status"] in ("PASS", "FAIL") for c in summary["checks"])
    engine = summary["engine"]
    ours = [r for r in engine["rows"] if r["cache"] == "ours M=128"]
    assert len(ours) == 2 and all(r["evictions_in_decode"] >= 1 and r["kv_bytes"] > 0 for r in ours)
    assert "| check | measured | target | status |" in (tmp_path / "summary.md").read_text()
    for step in ("bench_select_compact", "bench_decode_attention", "bench_engine"):
        assert (tmp_path / f"{step}.rc").read_text().strip() == "0"
