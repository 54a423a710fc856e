"""The CPU attention over contiguous K/V views == its plain-torch reference, on random shapes."""

from __future__ import annotations

import pytest
import torch

from dbtrimkv.cache.view_attention import (attend_view, attend_view_and_new, attend_view_with_mass, attention_mass,
                                           reference_attention, reference_attention_mass, validity_bias)
from dbtrimkv.cache.views import KVViews

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float64: 2e-5}  # (the reference is float32)


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


def _counted(seed: int, q_valid, batch: int, new: int, window: int | None):
    """The queries a policy counts: every real one (H2O) or the last `window` real ones (SnapKV)."""
    real = torch.ones(batch, new, dtype=torch.bool) if q_valid is None else q_valid
    if window is None:
        return real
    rank = real.cumsum(1)
    return real & (rank > rank[:, -1:] - window)


@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("padding", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("window", [None, 3], ids=["all", "window"])
def test_attention_mass_matches_reference(dtype, seed, padding, window, monkeypatch):
    """Prefill (view + causal new columns): the mass each key receives from the counted queries equals
    the reference softmax's column sums, in blocks of queries as in one."""
    monkeypatch.setattr("dbtrimkv.cache.view_attention.MASS_QUERY_BLOCK", 4)  # several blocks per case
    new = 2 + seed * 5
    q, q_valid, view_k, _, length, k_new, _, scale = random_case(70 + seed, dtype, new, padding)
    counted = _counted(seed, q_valid, q.shape[0], new, window)
    got = attention_mass(q, counted, view_k, length, k_new, q_valid, scale)
    want = reference_attention_mass(q, counted, view_k, length, k_new, q_valid, scale)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    rows = counted.sum(1).float() * (q.shape[1] // view_k.shape[1])  # each counted query spreads mass 1 per head
    torch.testing.assert_close(got[0].sum(-1) + got[1].sum(-1), rows[:, None].expand_as(got[0].sum(-1)),
                               atol=1e-4, rtol=1e-4)
    assert torch.all(got[0][torch.arange(view_k.shape[2]) >= length[..., None]] == 0)


@pytest.mark.parametrize("seed", range(4))
def test_attention_mass_in_decode_reads_the_view_only(seed):
    q, _, view_k, _, length, _, _, scale = random_case(90 + seed, torch.float32, 1, False)
    length = length.clamp(min=1)
    counted = torch.ones(q.shape[0], 1, dtype=torch.bool)
    got = attention_mass(q, counted, view_k, length, None, None, scale)
    want = reference_attention_mass(q, counted, view_k, length, None, None, scale)
    assert got[1].shape[2] == 0
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
@pytest.mark.parametrize("seed", range(4))
def test_decode_with_mass_matches_reference(dtype, seed):
    """Decode for a policy that reads attention: one softmax gives the output and the mass per view row."""
    q, _, view_k, view_v, length, k_new, v_new, scale = random_case(110 + seed, dtype, 1, False)
    length = length.clamp(min=1)
    batch = q.shape[0]
    counted = torch.ones(batch, 1, dtype=torch.bool)
    q_valid = None
    if batch > 1:  # a padding row: zero output, no mass
        counted[0] = False
        q_valid = counted.clone()
    out, mass = attend_view_with_mass(q, q_valid, view_k, view_v, validity_bias(length, view_k.shape[2], dtype), scale,
                                      counted)
    want = reference_attention(q, q_valid, view_k, view_v, length, k_new[:, :, :0], v_new[:, :, :0], scale)
    assert out.dtype == dtype and mass.dtype == torch.float32
    torch.testing.assert_close(out.float(), want.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    want_mass, _ = reference_attention_mass(q, counted, view_k, length, None, None, scale)
    torch.testing.assert_close(mass, want_mass, atol=2e-5, rtol=2e-5)
