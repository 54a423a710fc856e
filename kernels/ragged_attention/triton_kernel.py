"""Triton ragged attention over the slot pool: decode (split-K) and prefill kernels.

Same contract as `naive.py`. Why it is built this way:
- K/V rows are read straight from the pool through the segment's slot table: no gather copy.
- Decode (one query per sequence) is memory bound, so one program per (sequence, KV head,
  split) loads every row once for all query heads of its GQA group (they share the KV head),
  and long segments are cut into splits processed in parallel (flash-decoding); a second kernel
  merges the splits' partial softmax states. The split count depends only on shapes (the
  table's average capacity per segment, the SM count), so there is no host synchronisation;
  each program derives its row range from the segment's actual length on device.
- Prefill (several queries per sequence) runs a flash-attention loop per block of queries; the
  rows of a block are (query, head of the GQA group) pairs, so K/V tiles are shared by the group.
- Softmax state and accumulators are float32 whatever the input dtype; float32 inputs use IEEE
  dot products (no TF32). A query sees rows with `pos <= q_pos`; padding queries (`q_pos < 0`)
  and queries that see nothing output zeros.
- Interpreter (TRITON_INTERPRET=1, how the CPU tests run): half-precision products are done from
  float32 copies (exact for bf16/fp16 operands) because the interpreter's bf16 `tl.dot` is wrong,
  and reductions call `tl.reduce` with triton.language's own combine functions rather than the
  `@jit` wrappers `tl.sum`/`tl.max`, which the interpreter rejects when triton was imported
  before the variable was set (the combine functions keep its fast numpy path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
BLOCK_ROWS = 64  # pool rows per step (32 for float32 inputs, which take twice the shared memory)
MIN_ROWS_PER_SPLIT = 128
MAX_SPLITS = 64
PROGRAMS_PER_SM = 4  # decode programs in flight per SM that the split count aims for
PREFILL_BLOCK_M = 64


@triton.jit
def _row_sum(x):
    return tl.reduce(x, 1, tl.standard._sum_combine)


@triton.jit
def _row_max(x):
    return tl.reduce(x, 1, tl.standard._elementwise_max)


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    """Matrix product with a float32 result; FP32 computes it from float32 copies (exact IEEE)."""
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _attend_block(q, acc, m, l, rows, visible, k_pool, v_pool, stride_k, stride_v, dims, dim_ok, scale_log2,
                  FP32: tl.constexpr):
    """One online-softmax step of `q` [M, D] over the pool rows `rows` [N] (invisible rows masked)."""
    k = tl.load(k_pool + rows[:, None] * stride_k + dims[None, :], mask=(rows[:, None] >= 0) & dim_ok[None, :],
                other=0.0)
    logits = _dot(q, tl.trans(k.to(q.dtype)), FP32) * scale_log2
    logits = tl.where(visible, logits, float("-inf"))
    m_new = tl.maximum(m, _row_max(logits))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(logits - m_safe[:, None])
    v = tl.load(v_pool + rows[:, None] * stride_v + dims[None, :], mask=(rows[:, None] >= 0) & dim_ok[None, :],
                other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(q.dtype), v.to(q.dtype), FP32)
    return acc, m_new, l * alpha + _row_sum(p)


@triton.jit
def _decode_partial(q, q_pos, k_pool, v_pool, pos_pool, table, seg_start, seg_len, part_acc, part_ml,
                    layer, num_layers, num_kv_heads, scale_log2,
                    stride_qb, stride_qh, stride_qpb, stride_k, stride_v,
                    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                    NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, FP32: tl.constexpr):
    """Partial softmax state of one split of one segment for the GQA group's query heads."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    seg = (b * num_layers + layer) * num_kv_heads + h
    start = tl.load(seg_start + seg)
    n = tl.load(seg_len + seg).to(tl.int64)
    query_pos = tl.load(q_pos + b * stride_qpb)
    n = tl.where(query_pos < 0, 0, n)
    per_split = ((n + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n)

    heads = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < D
    qv = tl.load(q + b * stride_qb + (h * GROUP + heads[:, None]) * stride_qh + dims[None, :],
                 mask=(heads[:, None] < GROUP) & dim_ok[None, :], other=0.0)
    acc = tl.full((GROUP_PAD, D_PAD), 0.0, tl.float32)
    m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l = tl.full((GROUP_PAD,), 0.0, tl.float32)
    for j in range(lo, hi, BLOCK_N):
        offs = j + tl.arange(0, BLOCK_N)
        inside = offs < hi
        rows = tl.load(table + start + offs, mask=inside, other=-1).to(tl.int64)
        key_pos = tl.load(pos_pool + rows, mask=inside, other=0)
        visible = inside & (key_pos <= query_pos)
        acc, m, l = _attend_block(qv, acc, m, l, tl.where(visible, rows, -1), visible[None, :], k_pool, v_pool,
                                  stride_k, stride_v, dims, dim_ok, scale_log2, FP32)
    part = (bh * NUM_SPLITS + split) * GROUP + heads
    head_ok = heads < GROUP
    tl.store(part_acc + part[:, None] * D + dims[None, :], acc, mask=head_ok[:, None] & dim_ok[None, :])
    tl.store(part_ml + 2 * part, m, mask=head_ok)
    tl.store(part_ml + 2 * part + 1, l, mask=head_ok)


@triton.jit
def _decode_merge(part_acc, part_ml, out, num_kv_heads, stride_ob, stride_oh,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                  NUM_SPLITS: tl.constexpr):
    """Merge the splits' (max, sum, accumulator) into the normalised output of the group's heads."""
    bh = tl.program_id(0)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    heads = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, D_PAD)
    head_ok = heads < GROUP
    store_ok = head_ok[:, None] & (dims[None, :] < D)
    acc = tl.full((GROUP_PAD, D_PAD), 0.0, tl.float32)
    m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l = tl.full((GROUP_PAD,), 0.0, tl.float32)
    for split in range(NUM_SPLITS):
        part = (bh * NUM_SPLITS + split) * GROUP + heads
        m_split = tl.load(part_ml + 2 * part, mask=head_ok, other=float("-inf"))
        l_split = tl.load(part_ml + 2 * part + 1, mask=head_ok, other=0.0)
        acc_split = tl.load(part_acc + part[:, None] * D + dims[None, :], mask=store_ok, other=0.0)
        m_new = tl.maximum(m, m_split)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        old_w = tl.exp2(m - m_safe)
        split_w = tl.exp2(m_split - m_safe)
        acc = acc * old_w[:, None] + acc_split * split_w[:, None]
        l = l * old_w + l_split * split_w
        m = m_new
    result = tl.where(l[:, None] > 0, acc / tl.where(l > 0, l, 1.0)[:, None], 0.0)
    tl.store(out + b * stride_ob + (h * GROUP + heads[:, None]) * stride_oh + dims[None, :],
             result.to(out.dtype.element_ty), mask=store_ok)


@triton.jit
def _prefill(q, q_pos, k_pool, v_pool, pos_pool, table, seg_start, seg_len, out,
             layer, num_layers, num_kv_heads, num_queries, scale_log2,
             stride_qb, stride_qh, stride_qc, stride_qpb, stride_qpc, stride_k, stride_v,
             stride_ob, stride_oh, stride_oc,
             GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP32: tl.constexpr):
    """Flash attention of a block of (query, group head) rows over their segment's visible rows."""
    block = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    seg = (b * num_layers + layer) * num_kv_heads + h
    start = tl.load(seg_start + seg)
    n = tl.load(seg_len + seg).to(tl.int64)

    r = block * BLOCK_M + tl.arange(0, BLOCK_M)
    query = r // GROUP
    head = h * GROUP + r % GROUP
    row_ok = query < num_queries
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < D
    query_pos = tl.load(q_pos + b * stride_qpb + query * stride_qpc, mask=row_ok, other=-1).to(tl.int64)
    qv = tl.load(q + b * stride_qb + head[:, None] * stride_qh + query[:, None] * stride_qc + dims[None, :],
                 mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    acc = tl.full((BLOCK_M, D_PAD), 0.0, tl.float32)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.full((BLOCK_M,), 0.0, tl.float32)
    n = tl.where(tl.reduce(query_pos, 0, tl.standard._elementwise_max) < 0, 0, n)
    for j in range(0, n, BLOCK_N):
        offs = j + tl.arange(0, BLOCK_N)
        inside = offs < n
        rows = tl.load(table + start + offs, mask=inside, other=-1).to(tl.int64)
        key_pos = tl.load(pos_pool + rows, mask=inside, other=0).to(tl.int64)
        visible = inside[None, :] & (key_pos[None, :] <= query_pos[:, None])
        acc, m, l = _attend_block(qv, acc, m, l, tl.where(inside, rows, -1), visible, k_pool, v_pool,
                                  stride_k, stride_v, dims, dim_ok, scale_log2, FP32)
    result = tl.where(l[:, None] > 0, acc / tl.where(l > 0, l, 1.0)[:, None], 0.0)
    tl.store(out + b * stride_ob + head[:, None] * stride_oh + query[:, None] * stride_oc + dims[None, :],
             result.to(out.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def decode_splits(table: torch.Tensor, n_seg: int, num_programs: int) -> int:
    """Splits per segment: at least MIN_ROWS_PER_SPLIT rows each (from the table's average capacity
    per segment, a shape: no sync) and, on CUDA, about PROGRAMS_PER_SM programs per SM in all."""
    splits = triton.cdiv(table.numel() // max(n_seg, 1), MIN_ROWS_PER_SPLIT)
    if table.is_cuda:
        sms = torch.cuda.get_device_properties(table.device).multi_processor_count
        splits = min(splits, triton.cdiv(PROGRAMS_PER_SM * sms, num_programs))
    return max(1, min(MAX_SPLITS, splits))


def _block_rows(q: torch.Tensor) -> int:
    return BLOCK_ROWS if q.element_size() <= 2 else BLOCK_ROWS // 2


def _float32_dots(q: torch.Tensor) -> bool:
    return q.dtype == torch.float32 or triton.knobs.runtime.interpret


def _check_pool(k_pool, v_pool):
    if k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError("k_pool and v_pool rows must be contiguous (stride 1 on the last dim)")


@torch.no_grad()
def decode_attention(q, q_pos, k_pool, v_pool, pos_pool, table, seg_start, seg_len, layer, num_layers, scale,
                     num_splits=None):
    """C == 1: split-K over each segment, then a merge pass. Output `[B, Hq, 1, D]`."""
    _check_pool(k_pool, v_pool)
    batch, num_q_heads, _, dim = q.shape
    num_kv_heads = seg_len.numel() // (batch * num_layers)
    group = num_q_heads // num_kv_heads
    group_pad = max(16, triton.next_power_of_2(group))
    dim_pad = max(16, triton.next_power_of_2(dim))
    programs = batch * num_kv_heads
    splits = num_splits or decode_splits(table, seg_len.numel(), programs)
    part_acc = torch.empty(programs * splits * group, dim, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(programs * splits * group, 2, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, num_q_heads, 1, dim, dtype=q.dtype, device=q.device)
    fp32 = _float32_dots(q)
    _decode_partial[(programs, splits)](
        q, q_pos, k_pool, v_pool, pos_pool, table, seg_start, seg_len, part_acc, part_ml,
        layer, num_layers, num_kv_heads, scale * LOG2E,
        q.stride(0), q.stride(1), q_pos.stride(0), k_pool.stride(0), v_pool.stride(0),
        GROUP=group, GROUP_PAD=group_pad, D=dim, D_PAD=dim_pad, NUM_SPLITS=splits, BLOCK_N=_block_rows(q),
        FP32=fp32,
    )
    _decode_merge[(programs,)](
        part_acc, part_ml, out, num_kv_heads, out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, D=dim, D_PAD=dim_pad, NUM_SPLITS=splits,
    )
    return out


@torch.no_grad()
def prefill_attention(q, q_pos, k_pool, v_pool, pos_pool, table, seg_start, seg_len, layer, num_layers, scale):
    """C > 1: blocks of (query, group head) rows against the segment. Output `[B, Hq, C, D]`."""
    _check_pool(k_pool, v_pool)
    batch, num_q_heads, num_queries, dim = q.shape
    num_kv_heads = seg_len.numel() // (batch * num_layers)
    group = num_q_heads // num_kv_heads
    dim_pad = max(16, triton.next_power_of_2(dim))
    out = torch.empty(batch, num_q_heads, num_queries, dim, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(num_queries * group, PREFILL_BLOCK_M), batch * num_kv_heads)
    _prefill[grid](
        q, q_pos, k_pool, v_pool, pos_pool, table, seg_start, seg_len, out,
        layer, num_layers, num_kv_heads, num_queries, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), q_pos.stride(0), q_pos.stride(1), k_pool.stride(0), v_pool.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=group, D=dim, D_PAD=dim_pad, BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=_block_rows(q),
        FP32=_float32_dots(q),
    )
    return out


def ragged_attention(q, q_pos, k_pool, v_pool, pos_pool, table, seg_start, seg_len, layer, num_layers, scale):
    """Attention output `[B, Hq, C, D]`: the decode kernel for C == 1, the prefill kernel otherwise."""
    kernel = decode_attention if q.shape[2] == 1 else prefill_attention
    return kernel(q, q_pos, k_pool, v_pool, pos_pool, table, seg_start, seg_len, layer, num_layers, scale)
