"""ragged_attention: Triton decode/prefill kernels == torch reference; the reference == a loop."""

from __future__ import annotations

import math

import pytest
import torch
from slot_pools import SlotPool, random_slot_pool

from dbtrimkv.kernels import ragged_attention
from dbtrimkv.kernels.ragged_attention import naive

L, H = 3, 2
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def random_queries(seed: int, pool: SlotPool, group: int, num_queries: int, dim: int, dtype, device):
    """Queries `[B, H*group, C, D]` (a transposed view, as the model produces) and their positions.

    Positions: the next tokens after `seen`, some moved back (they see only part of their
    segment), a padding query (-1) last in the last sequence (all of it for decode, so decode pools
    have three sequences) and, for prefill, a first query in sequence 0 (which holds the empty and
    length-1 segments) placed before every cached entry of its sequence (it sees nothing)."""
    gen = torch.Generator().manual_seed(seed + 104729)
    q = torch.randn(pool.batch, num_queries, H * group, dim, generator=gen).transpose(1, 2)
    q_pos = pool.seen.cpu()[:, None] + torch.arange(num_queries)[None, :]
    q_pos[:, ::2] -= torch.randint(0, 30, (pool.batch, (num_queries + 1) // 2), generator=gen)  # mask some rows
    q_pos[-1, -1] = -1
    slots = [slot for s in range(L * H) for slot in pool.segment_slots(s)]
    if num_queries > 2 and slots:
        q_pos[0, 0] = int(pool.pos[slots].min()) - 1
    return q.to(device=device, dtype=dtype), q_pos.to(device)


def assert_matches_reference(pool: SlotPool, q, q_pos, layer, scale, impl=ragged_attention):
    expected = naive.ragged_attention(q, q_pos, *pool.attention_args(), layer, L, scale)
    got = impl(q, q_pos, *pool.attention_args(), layer, L, scale)
    assert got.shape == expected.shape and got.dtype == q.dtype
    tol = TOLERANCE[q.dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)
    assert torch.all(got[-1, :, -1] == 0)  # padding query
    return got


@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
@pytest.mark.parametrize("group,dim", [(1, 16), (2, 24), (4, 32)])
def test_decode(triton_backend, device, dtype, group, dim):
    seed = 100 + group
    pool = random_slot_pool(seed, batch=3, num_layers=L, num_kv_heads=H, max_len=150, device=device, dim=dim,
                            dtype=dtype)
    q, q_pos = random_queries(seed, pool, group, 1, dim, dtype, device)
    for layer in range(L):
        assert_matches_reference(pool, q, q_pos, layer, 1 / math.sqrt(dim))


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_decode_split_k_merge(triton_backend, device, splits):
    from dbtrimkv.kernels.ragged_attention.triton_kernel import decode_attention

    pool = random_slot_pool(110 + splits, batch=3, num_layers=L, num_kv_heads=H, max_len=400, device=device)
    assert int(pool.seg_len.max()) > 256  # segments span several 64-row splits
    q, q_pos = random_queries(110, pool, 2, 1, 16, torch.float32, device)
    q_pos[1, 0] = pool.seen[1]  # sees its whole segment

    def with_splits(*args):
        return decode_attention(*args, num_splits=splits)

    assert_matches_reference(pool, q, q_pos, 1, 0.3, impl=with_splits)


@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
@pytest.mark.parametrize("group,num_queries", [(1, 5), (2, 40), (4, 17)])
def test_prefill(triton_backend, device, dtype, group, num_queries):
    seed = 120 + num_queries
    pool = random_slot_pool(seed, batch=2, num_layers=L, num_kv_heads=H, max_len=90, device=device, dim=24,
                            dtype=dtype)
    q, q_pos = random_queries(seed, pool, group, num_queries, 24, dtype, device)
    for layer in (0, 1):
        got = assert_matches_reference(pool, q, q_pos, layer, 0.2)
        assert torch.all(got[0, :, 0] == 0)  # the query placed before every cached entry sees nothing


def test_all_segments_empty(triton_backend, device):
    pool = random_slot_pool(130, batch=1, num_layers=L, num_kv_heads=H, max_len=6, device=device)
    pool.seg_len.zero_()
    for num_queries in (1, 3):
        q, q_pos = random_queries(130, pool, 2, num_queries, 16, torch.float32, device)
        got = ragged_attention(q, q_pos, *pool.attention_args(), 0, L, 0.25)
        assert torch.all(got == 0)


def test_reference_matches_a_loop():
    """Per query: softmax over the segment's rows with pos <= q_pos, in float64."""
    pool = random_slot_pool(140, batch=2, num_layers=L, num_kv_heads=H, max_len=12, device="cpu", dim=8)
    group, layer, scale = 2, 1, 0.35
    q, q_pos = random_queries(140, pool, group, 3, 8, torch.float32, "cpu")
    got = naive.ragged_attention(q, q_pos, *pool.attention_args(), layer, L, scale)
    for b in range(pool.batch):
        for head in range(H * group):
            seg = (b * L + layer) * H + head // group
            slots = pool.segment_slots(seg)
            for c in range(q.shape[2]):
                rows = [x for x in slots if 0 <= q_pos[b, c] and pool.pos[x] <= q_pos[b, c]]
                if not rows:
                    assert torch.all(got[b, head, c] == 0)
                    continue
                keys, values = pool.keys[rows].double(), pool.values[rows].double()
                weights = torch.softmax(keys @ q[b, head, c].double() * scale, 0)
                torch.testing.assert_close(got[b, head, c].double(), weights @ values, atol=1e-5, rtol=1e-5)
