"""The Triton kernels compiled on a GPU and compared with their torch references at the real
Qwen3-VL-4B/8B shapes in bf16: 36 layers x 8 KV heads per sequence, head_dim 128, 32 query heads
(GQA group 4), segments of M + buffer entries (select) and thousands of entries (decode).
Skipped without CUDA (bench/gpu_validate.sh runs them first on a lent GPU)."""

from __future__ import annotations

import math

import pytest
import torch
from slot_pools import random_slot_pool

from dbtrimkv.kernels import ragged_attention, select_and_compact
from dbtrimkv.kernels.ragged_attention import naive as attention_naive
from dbtrimkv.kernels.select_compact import naive as select_naive

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
L, H, GROUP, D = 36, 8, 4, 128


@pytest.mark.parametrize("batch, max_len", [(1, 4096), (4, 1024)])
def test_decode_attention_real_shape_bf16(batch, max_len):
    pool = random_slot_pool(7 + batch, batch=batch, num_layers=L, num_kv_heads=H, max_len=max_len, device="cuda",
                            dim=D, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(batch)
    q = torch.randn(batch, 1, H * GROUP, D, generator=gen).transpose(1, 2).to("cuda", torch.bfloat16)
    q_pos = pool.seen[:, None].to(torch.int64)
    for layer in (0, L // 2, L - 1):
        expected = attention_naive.ragged_attention(q, q_pos, *pool.attention_args(), layer, L, 1 / math.sqrt(D))
        got = ragged_attention(q, q_pos, *pool.attention_args(), layer, L, 1 / math.sqrt(D))
        torch.testing.assert_close(got.float(), expected.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("memory_size, buffer", [(128, 32), (512, 128)])
def test_select_and_compact_real_shape(memory_size, buffer):
    pool = random_slot_pool(memory_size, batch=2, num_layers=L, num_kv_heads=H, max_len=memory_size + buffer,
                            device="cuda", dim=D, dtype=torch.bfloat16)
    keep = torch.full((2,), memory_size * L * H, dtype=torch.int64, device="cuda")
    results = []
    for impl in (select_naive.select_and_compact, select_and_compact):
        after = pool.clone()
        count = impl(*after.select_args(), keep, L * H, L * H)
        results.append((int(count), after))
    (expected_count, expected), (count, got) = results
    assert count == expected_count > 0
    assert torch.equal(got.seg_len, expected.seg_len) and torch.equal(got.table, expected.table)
    assert got.free_list() == expected.free_list()
