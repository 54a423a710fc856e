"""Attention over a layer's contiguous K/V view plus the forward's own new K/V (the CPU path).

Why: on CPU the engine attends over `KVViews` (contiguous per-layer copies of the cached entries,
see `views.py`) instead of gathering every kept row through the slot tables at every step. Every
entry cached before a forward precedes every query of that forward, so the attention of a
forward splits in two, merged exactly by their log-sum-exp:

- the queries over the view (the entries cached before this forward): no causal mask, only an
  additive validity bias `[B, H, 1, C]` (0 for the first `length[b, h]` columns, the dtype's
  minimum elsewhere) that covers the ragged segment lengths;
- the queries over this forward's new K/V: causal, plus the padding of the new columns (a
  `[B, 1, T, T]` mask only when some column is padding).

No mask of heads x queries x cached entries is ever built, and grouped-query heads share their
KV head's rows without copies (the queries of a KV head's group are one block of rows).
Decode is simpler still: the new token is already in the view and sees every entry of it
(`attend_view`). Padding queries (`q_valid` False) get a zero output, like the slot-pool contract
(`kernels/ragged_attention/naive.py`). `reference_attention` is the plain-torch contract: one
float32 softmax over the concatenated keys with an explicit mask; the tests compare the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_flash_with_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # (output, logsumexp)


def validity_bias(length: torch.Tensor, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive bias `[*length.shape, 1, columns]`: 0 where column < length, the dtype's minimum elsewhere."""
    valid = torch.arange(columns, device=length.device) < length[..., None]
    bias = torch.zeros(*length.shape, 1, columns, dtype=dtype, device=length.device)
    return bias.masked_fill_(~valid[..., None, :], torch.finfo(dtype).min)


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """`[B, Hq, T, D]` -> `[B, H, g*T, D]`: the queries of each KV head's group as one block of rows."""
    batch, q_heads, length, dim = q.shape
    return q.reshape(batch, kv_heads, (q_heads // kv_heads) * length, dim)


def _zero_padding(out: torch.Tensor, q_valid: torch.Tensor | None) -> torch.Tensor:
    if q_valid is None:
        return out
    return torch.where(q_valid[:, None, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def attend_view(q, q_valid, view_k, view_v, view_bias, scale):
    """Queries `[B, Hq, T, D]` that see every valid entry of the view (decode: the new token is in it).
    `view_k`, `view_v` `[B, H, C, D]`, `view_bias` `[B, H, 1, C]`; returns `[B, Hq, T, D]`."""
    batch, q_heads, length, dim = q.shape
    out = F.scaled_dot_product_attention(_grouped(q, view_k.shape[1]), view_k, view_v, attn_mask=view_bias,
                                         scale=scale)
    return _zero_padding(out.reshape(batch, q_heads, length, dim), q_valid)


def attend_view_and_new(q, q_valid, view_k, view_v, view_bias, k_new, v_new, scale):
    """Queries `[B, Hq, T, D]` over the view (entries cached before this forward, all visible) and over
    this forward's new K/V `[B, H, T, D]` (causal; padding columns, `q_valid` False, are not keys).
    Returns `[B, Hq, T, D]` in the dtype of `q`."""
    batch, q_heads, length, dim = q.shape
    kv_heads = k_new.shape[1]
    group = q_heads // kv_heads
    k_rep = k_new[:, :, None].expand(batch, kv_heads, group, length, dim).reshape(batch, q_heads, length, dim)
    v_rep = v_new[:, :, None].expand(batch, kv_heads, group, length, dim).reshape(batch, q_heads, length, dim)
    if q_valid is None:
        new_out, new_lse = _flash_with_lse(q, k_rep, v_rep, 0.0, True, scale=scale)
    else:
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        allowed = (causal & q_valid[:, None, :]) | torch.eye(length, dtype=torch.bool, device=q.device)
        mask = torch.zeros(batch, 1, length, length, dtype=q.dtype, device=q.device)
        mask.masked_fill_(~allowed[:, None], torch.finfo(q.dtype).min)
        new_out, new_lse = _flash_with_lse(q, k_rep, v_rep, 0.0, False, attn_mask=mask, scale=scale)
    if view_k.shape[2] == 0:
        return _zero_padding(new_out, q_valid)
    old_out, old_lse = _flash_with_lse(_grouped(q, kv_heads), view_k, view_v, 0.0, False, attn_mask=view_bias,
                                       scale=scale)
    old_out = old_out.reshape(batch, q_heads, length, dim)
    old_lse = old_lse.reshape(batch, q_heads, length)
    top = torch.maximum(old_lse, new_lse)
    w_old = torch.exp(old_lse - top)[..., None]
    w_new = torch.exp(new_lse - top)[..., None]
    out = (old_out.float() * w_old + new_out.float() * w_new) / (w_old + w_new)
    return _zero_padding(out.to(q.dtype), q_valid)


def reference_attention(q, q_valid, view_k, view_v, view_length, k_new, v_new, scale):
    """The contract, in plain torch: each real query attends, in one float32 softmax, to the first
    `view_length[b, h]` rows of its KV head's view and to the real new columns at or before its own;
    a padding query (or one that sees nothing) outputs zeros. `k_new`/`v_new` may have zero columns
    when the new tokens are already in the view (decode)."""
    batch, q_heads, length, dim = q.shape
    kv_heads, columns, new = view_k.shape[1], view_k.shape[2], k_new.shape[2]
    valid = torch.ones(batch, length, dtype=torch.bool) if q_valid is None else q_valid.cpu()
    keys = torch.cat([view_k, k_new], 2).float().repeat_interleave(q_heads // kv_heads, 1)
    values = torch.cat([view_v, v_new], 2).float().repeat_interleave(q_heads // kv_heads, 1)
    old = torch.arange(columns)[None, None, None, :] < view_length.cpu()[:, :, None, None]  # [B, H, 1, C]
    old = old.expand(batch, kv_heads, length, columns)
    causal = torch.ones(length, new, dtype=torch.bool).tril()  # new columns are this forward's queries
    fresh = (causal[None] & valid[:, None, :new])[:, None].expand(batch, kv_heads, length, new)
    visible = torch.cat([old, fresh], 3).repeat_interleave(q_heads // kv_heads, 1).to(q.device)
    logits = (q.float() @ keys.transpose(-1, -2)) * scale
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    out = probs @ values
    keep = valid.to(q.device)[:, None, :, None] & visible.any(-1, keepdim=True)
    return torch.where(keep, out, torch.zeros(())).to(q.dtype)
