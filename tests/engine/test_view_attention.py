"""The CPU attention over contiguous K/V views == its plain-torch reference, on random shapes."""

from __future__ import annotations

import pytest
import torch

from dbtrimkv.cache.view_attention import attend_view, attend_view_and_new, reference_attention, validity_bias
from dbtrimkv.cache.views import KVViews

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def random_case(seed: int, dtype, new: int, padding: bool, empty_view: bool = False):
    """Fresh random queries, ragged view lengths (some heads empty) and new K/V."""
    gen = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 4, (1,), generator=gen))
    kv_heads = int(torch.randint(1, 4, (1,), generator=gen))
    group = int(torch.randint(1, 4, (1,), generator=gen))
    dim = int(torch.randint(2, 9, (1,), generator=gen)) * 8
    columns = 0 if empty_view else int(torch.randint(1, 60, (1,), generator=gen))
    length = torch.randint(0, columns + 1, (batch, kv_heads), generator=gen)
    if columns:
        length[0, 0] = columns  # one full segment
    view_k = torch.randn(batch, kv_heads, columns, dim, generator=gen).to(dtype)
    view_v = torch.randn(batch, kv_heads, columns, dim, generator=gen).to(dtype)
    # the model hands queries as a transposed view [B, T, Hq, D] -> [B, Hq, T, D]
    q = torch.randn(batch, new, kv_heads * group, dim, generator=gen).to(dtype).transpose(1, 2)
    k_new = torch.randn(batch, new, kv_heads, dim, generator=gen).to(dtype).transpose(1, 2)
    v_new = torch.randn(batch, new, kv_heads, dim, generator=gen).to(dtype).transpose(1, 2)
    q_valid = None
    if padding:
        pads = torch.randint(0, new, (batch,), generator=gen)
        q_valid = torch.arange(new)[None, :] >= pads[:, None]  # left padding
        q_valid[-1, : new // 2 + 1] = False
    scale = float(torch.rand((), generator=gen)) * 0.5 + 0.05
    return q, q_valid, view_k, view_v, length, k_new, v_new, scale


@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("padding", [False, True], ids=["dense", "padded"])
def test_view_and_new_matches_reference(dtype, seed, padding):
    new = 1 + seed * 7
    q, q_valid, view_k, view_v, length, k_new, v_new, scale = random_case(seed, dtype, new, padding)
    bias = validity_bias(length, view_k.shape[2], dtype)
    got = attend_view_and_new(q, q_valid, view_k, view_v, bias, k_new, v_new, scale)
    want = reference_attention(q, q_valid, view_k, view_v, length, k_new, v_new, scale)
    assert got.shape == q.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    if q_valid is not None:
        assert torch.all(got.transpose(1, 2)[~q_valid] == 0)


@pytest.mark.parametrize("padding", [False, True], ids=["dense", "padded"])
def test_empty_view_is_plain_causal_attention(padding):
    q, q_valid, view_k, view_v, length, k_new, v_new, scale = random_case(40, torch.float32, 9, padding,
                                                                          empty_view=True)
    got = attend_view_and_new(q, q_valid, view_k, view_v, validity_bias(length, 0, q.dtype), k_new, v_new, scale)
    want = reference_attention(q, q_valid, view_k, view_v, length, k_new, v_new, scale)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
@pytest.mark.parametrize("seed", range(4))
def test_decode_over_the_view_matches_reference(dtype, seed):
    q, _, view_k, view_v, length, k_new, v_new, scale = random_case(50 + seed, dtype, 1, False)
    length = length.clamp(min=1)  # the new token is in the view: no segment is empty
    bias = validity_bias(length, view_k.shape[2], dtype)
    got = attend_view(q, None, view_k, view_v, bias, scale)
    want = reference_attention(q, None, view_k, view_v, length, k_new[:, :, :0], v_new[:, :, :0], scale)
    torch.testing.assert_close(got.float(), want.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


class _Pool:
    def __init__(self, k, v):
        self.k, self.v = k, v


@pytest.mark.parametrize("seed", range(3))
def test_views_rebuild_and_append_equal_a_fresh_gather(seed):
    """Rebuild from padded slot ids, then decode appends: the valid rows equal the pool's rows."""
    gen = torch.Generator().manual_seed(300 + seed)
    layers, batch, heads, dim, capacity = 3, 2, 2, 8, 200
    pool = _Pool(torch.randn(capacity, dim, generator=gen), torch.randn(capacity, dim, generator=gen))
    lengths = torch.randint(0, 12, (layers, batch, heads), generator=gen)
    width = int(lengths.max())
    valid = torch.arange(width) < lengths[..., None]
    perm = torch.randperm(capacity, generator=gen)
    slots = torch.where(valid, perm[: valid.numel()].view(valid.shape), 0)
    views = KVViews(layers)
    views.rebuild(pool, slots, valid, headroom=3)
    rows = [[[slots[l, b, h, : lengths[l, b, h]].tolist() for h in range(heads)] for b in range(batch)]
            for l in range(layers)]
    free = perm[valid.numel():].tolist()
    for _ in range(views.spare):
        token_batch = torch.tensor([b for b in range(batch) if torch.rand((), generator=gen) < 0.7], dtype=torch.long)
        views.plan_append(token_batch)
        for l in range(layers):
            new = torch.tensor([[free.pop() for _ in range(heads)] for _ in token_batch.tolist()], dtype=torch.long)
            views.append(l, pool.k[new], pool.v[new])
            for i, b in enumerate(token_batch.tolist()):
                for h in range(heads):
                    rows[l][b][h].append(int(new[i, h]))
    assert views.spare == 0
    for l in range(layers):
        for b in range(batch):
            for h in range(heads):
                n = len(rows[l][b][h])
                assert int(views.length[l, b, h]) == n
                assert torch.equal(views.k[l, b, h, :n], pool.k[rows[l][b][h]])
                assert torch.equal(views.v[l, b, h, :n], pool.v[rows[l][b][h]])
                assert torch.all(views.bias[l, b, h, 0, :n] == 0)
                assert torch.all(views.bias[l, b, h, 0, n:] == torch.finfo(torch.float32).min)
