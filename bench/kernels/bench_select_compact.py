"""Benchmark one eviction step (global policy) at Qwen3-VL shapes: L=36 layers, H=8 KV heads.

Each segment holds M + buffer entries and every sequence keeps M * L * H of them (the state right
after a forward pass that filled the buffers). Compared implementations:
  triton     the Triton select-and-compact kernel (CUDA only)
  torch_ref  the torch reference (`naive.py`, also the engine's CPU path)
  topk_loop  the reference-implementation style: concatenate the scores of all (layer, head),
             torch.topk, then a Python loop over every (layer, head) building keep masks and
             re-indexing its slot table (slot tables only: no K/V bytes are copied here)
Usage: python bench/kernels/bench_select_compact.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pools import bench_pool  # noqa: E402
from report import publish  # noqa: E402
from timing import count_syncs, median_seconds  # noqa: E402

from dbtrimkv.kernels.select_compact import naive  # noqa: E402

L, H = 36, 8


def topk_loop(log_beta, pos, table, seg_start, seg_len, free_slots, free_top, seen, keep, group_size, segs_per_seq):
    """Global top-k per sequence, then one Python iteration per (layer, head) to re-index tables."""
    for b in range(seen.numel()):
        segs = range(b * segs_per_seq, (b + 1) * segs_per_seq)
        tables = [table[seg_start[s]: seg_start[s] + seg_len[s]].long() for s in segs]
        scores = torch.cat([naive.retention_scores(log_beta[t], pos[t], seen[b]) for t in tables])
        kept = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        kept[torch.topk(scores, int(keep[b])).indices] = True
        offset = 0
        for s, slots in zip(segs, tables):
            mask = kept[offset: offset + slots.numel()]
            offset += slots.numel()
            survivors, losers = slots[mask], slots[~mask]
            table[seg_start[s]: seg_start[s] + survivors.numel()] = survivors.to(table.dtype)
            seg_len[s] = survivors.numel()
            top = int(free_top)
            free_slots[top: top + losers.numel()] = losers.to(free_slots.dtype)
            free_top += losers.numel()


def implementations(device: torch.device) -> dict:
    impls = {"torch_ref": naive.select_and_compact, "topk_loop": topk_loop}
    if device.type == "cuda":
        from dbtrimkv.kernels.select_compact.triton_kernel import select_and_compact

        impls = {"triton": select_and_compact, **impls}
    return impls


def bench_case(batch, kept_per_head, buffer, device, repeat) -> dict:
    pool = bench_pool(batch, L, H, kept_per_head + buffer, device)
    pristine = [t.clone() for t in pool.mutable()]
    keep = torch.full((batch,), kept_per_head * L * H, dtype=torch.int64, device=device)
    args = (pool.log_beta, pool.pos, pool.table, pool.seg_start, pool.seg_len, pool.free_slots, pool.free_top,
            pool.seen, keep, L * H, L * H)

    def restore():
        for dst, src in zip(pool.mutable(), pristine):
            dst.copy_(src)

    row = {"B": batch, "M": kept_per_head, "buffer": buffer, "entries": batch * L * H * (kept_per_head + buffer)}
    for name, impl in implementations(device).items():
        row[f"{name}_ms"] = 1e3 * median_seconds(lambda: impl(*args), device, setup=restore, repeat=repeat)
        restore()
        row[f"{name}_syncs"] = count_syncs(lambda: impl(*args), device)
        restore()
        impl(*args)
        row[f"{name}_kept"] = int(pool.seg_len.sum())
        restore()
    for base in ("torch_ref", "topk_loop"):
        if "triton_ms" in row:
            row[f"speedup_vs_{base}"] = row[f"{base}_ms"] / row["triton_ms"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU: torch paths only)")
    parser.add_argument("--out", help="write the rows as JSON")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        cases = [(1, 128, 32), (1, 512, 32), (8, 128, 32)]
    else:
        cases = [(b, m, buf) for b in (1, 8) for m in (128, 512, 2048) for buf in (32, 128)]
    rows = [bench_case(b, m, buf, device, repeat=3 if args.quick else 10) for b, m, buf in cases]
    columns = ["B", "M", "buffer", "entries"]
    columns += [c for c in ("triton_ms", "torch_ref_ms", "topk_loop_ms", "speedup_vs_torch_ref", "speedup_vs_topk_loop",
                            "triton_syncs", "torch_ref_syncs", "topk_loop_syncs") if c in rows[0]]
    publish("select-and-compact, global policy, L=36 H=8", rows, columns, device, args.out,
            notes=["ms: median wall time of one eviction step (pool restored between calls, untimed)",
                   "targets: triton >= 10x faster than topk_loop, >= 2x faster than torch_ref, 1 host sync"])


if __name__ == "__main__":
    main()
