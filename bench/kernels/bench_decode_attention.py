"""Benchmark decode attention over the slot pool at Qwen3-VL shapes: H_kv=8, Hq=32, D=128, bf16.

One decode step of one layer (C = 1 query per sequence) over `entries` cached rows per KV head,
the rows scattered through a pool that holds all L=36 layers. Reported per case:
  triton     the Triton split-K decode kernel (CUDA only)
  torch_ref  the torch reference (`naive.py`: gather + SDPA, also the engine's CPU path)
  dense      scaled_dot_product_attention over contiguous K/V of the same number of tokens
Achieved bandwidth counts the bytes a decode step must read (K and V rows, slot ids, positions)
and is compared with the device copy bandwidth (`dst.copy_(src)` of a large buffer).
Usage: python bench/kernels/bench_decode_attention.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pools import bench_pool  # noqa: E402
from report import publish  # noqa: E402
from timing import copy_bandwidth, median_seconds  # noqa: E402

from dbtrimkv.kernels.ragged_attention import naive  # noqa: E402

H_KV, H_Q, D = 8, 32, 128


def implementations(device: torch.device) -> dict:
    impls = {"torch_ref": naive.ragged_attention}
    if device.type == "cuda":
        from dbtrimkv.kernels.ragged_attention.triton_kernel import ragged_attention

        impls = {"triton": ragged_attention, **impls}
    return impls


def bench_case(batch, entries, num_layers, dtype, device, copy_bytes_per_s, repeat) -> dict:
    pool = bench_pool(batch, num_layers, H_KV, entries, device, dim=D, dtype=dtype)
    layer = num_layers // 2
    gen = torch.Generator(device="cpu").manual_seed(1)
    q = torch.randn(batch, H_Q, 1, D, generator=gen).to(device=device, dtype=dtype)
    q_pos = pool.seen[:, None].clone()
    scale = D ** -0.5
    row_bytes = 2 * D * pool.keys.element_size() + 4 + 4  # K row, V row, slot id, position
    step_bytes = batch * H_KV * entries * row_bytes
    row = {"B": batch, "entries_per_head": entries, "entries_per_layer": batch * H_KV * entries,
           "dtype": str(dtype).removeprefix("torch.")}
    args = (q, q_pos, pool.keys, pool.values, pool.pos, pool.table, pool.seg_start, pool.seg_len, layer, num_layers,
            scale)
    for name, impl in implementations(device).items():
        seconds = median_seconds(lambda: impl(*args), device, repeat=repeat)
        row[f"{name}_ms"] = 1e3 * seconds
        row[f"{name}_GBps"] = step_bytes / seconds / 1e9
    keys = torch.randn(batch, H_KV, entries, D, generator=gen).to(device=device, dtype=dtype)
    values = torch.randn_like(keys)
    seconds = median_seconds(lambda: F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=True),
                             device, repeat=repeat)
    row["dense_ms"] = 1e3 * seconds
    row["copy_GBps"] = copy_bytes_per_s / 1e9
    if "triton_ms" in row:
        row["triton_vs_copy"] = row["triton_GBps"] / row["copy_GBps"]
        row["triton_vs_dense"] = row["dense_ms"] / row["triton_ms"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU: torch paths only)")
    parser.add_argument("--out", help="write the rows as JSON")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        cases, num_layers, copy_bytes, repeat = [(1, 2048), (1, 8192)], 2, 1 << 26, 3
    else:
        # >= 64k retained entries per layer: 8 heads x 8192 (B=1), 8 x 8 x 2048 (B=8), and larger
        cases, num_layers, copy_bytes, repeat = [(1, 8192), (1, 32768), (8, 2048), (8, 8192)], 36, 1 << 30, 20
    copy_bytes_per_s = copy_bandwidth(device, copy_bytes)
    rows = [bench_case(b, n, num_layers, torch.bfloat16, device, copy_bytes_per_s, repeat) for b, n in cases]
    columns = ["B", "entries_per_head", "entries_per_layer"]
    columns += [c for c in ("triton_ms", "torch_ref_ms", "dense_ms", "triton_GBps", "torch_ref_GBps", "copy_GBps",
                            "triton_vs_copy", "triton_vs_dense") if c in rows[0]]
    publish(f"decode attention, one layer of L={num_layers}, H_kv=8, Hq=32, D=128, bf16", rows, columns, device,
            args.out, notes=["GBps: bytes a decode step reads (K, V rows + slot ids + positions) / median time",
                             "targets: triton >= 60% of copy bandwidth at >= 64k entries/layer, no slower than dense"])


if __name__ == "__main__":
    main()
