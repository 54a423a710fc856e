"""Kernels of the engine, installed as `dbtrimkv.kernels`.

Each kernel lives in its own folder beside a plain torch reference with the same semantics
(`naive.py`); the reference is also the CPU path. `dispatch.py` picks the implementation:
CUDA tensors use Triton, CPU tensors the reference; `DBTRIMKV_KERNELS=torch|triton` forces one.

Storage layout shared by every kernel (see docs/architecture.md, "Storage"):
- pool: per-slot `log_beta[S]` (float32), `pos[S]` (int32, logical token position), K/V `[S, D]`;
- segments: one per (sequence b, layer l, kv head h), id `s = (b * L + l) * H + h`;
- slot tables in CSR form: `table[T]` (int32 slot ids), `seg_start[n_seg]` (int64 offset of
  segment s in `table`), `seg_len[n_seg]` (int32); a segment's ids are in increasing position
  order;
- free list: a stack `free_slots[S]` (int32) with its height in `free_top[1]` (int64).
"""

from .ragged_attention import ragged_attention
from .select_compact import select_and_compact, select_and_compact_by_score

__all__ = ["ragged_attention", "select_and_compact", "select_and_compact_by_score"]
