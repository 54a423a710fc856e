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

Policies that rank entries by the attention they receive (SnapKV, H2O) get it from `attention_mass`,
computed from the same view and new K/V (same visibility) for only the queries the policy counts
(SnapKV: the last `window`; H2O: all), instead of re-gathering every key from the slot pool.
`reference_attention_mass` is its plain-torch contract (the probabilities of `reference_attention`).
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


def attend_view_with_mass(q, q_valid, view_k, view_v, view_bias, scale, counted):
    """`attend_view` for one query per sequence (decode) that also returns the attention mass each view
    row received from the `counted` queries (`[B, 1]` bool), summed over the query heads of its KV head
    (`[B, H, C]` float32, as `attention_mass`). One float32 softmax serves both: the output is
    `probs @ V` instead of SDPA's (same math, float32 rounding)."""
    batch, q_heads, length, dim = q.shape
    logits = _grouped(q, view_k.shape[1]).float() @ view_k.float().transpose(-1, -2)  # [B, H, g, C]
    probs = torch.softmax(logits.mul_(scale).add_(view_bias.float()), -1)
    out = (probs @ view_v.float()).to(q.dtype).reshape(batch, q_heads, length, dim)
    return _zero_padding(out, q_valid), torch.where(counted[:, :, None], probs.sum(2), 0.0)


def attend_view_and_new(q, q_valid, view_k, view_v, view_bias, k_new, v_new, scale):
    """Queries `[B, Hq, T, D]` over the view (entries cached before this forward, all visible) and over
    this forward's new K/V `[B, H, T, D]` (causal; padding columns, `q_valid` False, are not keys).
    Returns `[B, Hq, T, D]` in the dtype of `q`."""
    batch, q_heads, length, dim = q.shape
    kv_heads = k_new.shape[1]
    group = q_heads // kv_heads
    mask = None
    if q_valid is not None:
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        allowed = (causal & q_valid[:, None, :]) | torch.eye(length, dtype=torch.bool, device=q.device)
        mask = torch.zeros(batch, 1, length, length, dtype=q.dtype, device=q.device)
        mask.masked_fill_(~allowed[:, None], torch.finfo(q.dtype).min)
    if view_k.shape[2] == 0:  # nothing cached before (a first chunk): plain causal attention, no merge
        out = F.scaled_dot_product_attention(q, k_new, v_new, attn_mask=mask, is_causal=mask is None, scale=scale,
                                             enable_gqa=True)
        return _zero_padding(out, q_valid)
    k_rep = k_new[:, :, None].expand(batch, kv_heads, group, length, dim).reshape(batch, q_heads, length, dim)
    v_rep = v_new[:, :, None].expand(batch, kv_heads, group, length, dim).reshape(batch, q_heads, length, dim)
    new_out, new_lse = _flash_with_lse(q, k_rep, v_rep, 0.0, mask is None, attn_mask=mask, scale=scale)
    old_out, old_lse = _flash_with_lse(_grouped(q, kv_heads), view_k, view_v, 0.0, False, attn_mask=view_bias,
                                       scale=scale)
    old_out = old_out.reshape(batch, q_heads, length, dim)
    old_lse = old_lse.reshape(batch, q_heads, length)
    # softmax over both key sets = the two outputs weighted by exp(lse) / (exp(old lse) + exp(new lse)),
    # in float32 at least (a float64 model's lse is float64: lerp wants one dtype for all three)
    acc = torch.promote_types(q.dtype, torch.float32)
    out = torch.lerp(new_out.to(acc), old_out.to(acc), torch.sigmoid(old_lse - new_lse).to(acc)[..., None])
    return _zero_padding(out.to(q.dtype), q_valid)


MASS_QUERY_BLOCK = 256  # counted queries per block in `attention_mass` (bounds its logits to block x keys)


def attention_mass(q, counted, view_k, view_length, k_new, new_valid, scale):
    """Attention probability each key receives from the `counted` queries (`[B, T]` bool), summed over
    them and over the query heads of its KV head, in float32: `(view [B, H, C], new [B, H, T])`.
    Visibility as in the attention above: every query sees the first `view_length[b, h]` rows of the
    view and the new columns at or before its own that are real (`new_valid` `[B, T]`, None = all);
    `k_new` None (decode: the new token is in the view) means no new columns."""
    batch, q_heads, _, dim = q.shape
    kv_heads, columns = view_k.shape[1], view_k.shape[2]
    group = q_heads // kv_heads
    keys = view_k.float()
    old_visible = (torch.arange(columns, device=q.device) < view_length[..., None])[:, :, None, :]  # [B, H, 1, C]
    picked = counted.any(0).nonzero().flatten()  # e.g. only SnapKV's window: skip the other queries' logits
    fresh = 0 if k_new is None else k_new.shape[2]
    mass = torch.zeros(batch, kv_heads, columns + fresh, dtype=torch.float32, device=q.device)
    for start in range(0, picked.numel(), MASS_QUERY_BLOCK):
        rows = picked[start : start + MASS_QUERY_BLOCK]
        block = rows.numel()
        logits = _grouped(q[:, :, rows].float(), kv_heads) @ keys.transpose(-1, -2)  # [B, H, g*t, C]
        visible = old_visible.expand(batch, kv_heads, group * block, columns)
        if fresh:
            logits = torch.cat([logits, _grouped(q[:, :, rows].float(), kv_heads) @ k_new.float().transpose(-1, -2)], -1)
            causal = torch.arange(fresh, device=q.device)[None, :] <= rows[:, None]  # [t, T]
            new_visible = causal[None] if new_valid is None else causal[None] & new_valid[:, None, :]  # [B|1, t, T]
            new_visible = new_visible[:, None, None].expand(batch, kv_heads, group, block, fresh)
            visible = torch.cat([visible, new_visible.reshape(batch, kv_heads, group * block, fresh)], -1)
        probs = torch.softmax((logits * scale).masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
        weight = counted[:, rows].to(torch.float32)[:, None, None, :].expand(batch, kv_heads, group, block)
        mass += (weight.reshape(batch, kv_heads, 1, group * block) @ probs)[:, :, 0]
    return mass[..., :columns], mass[..., columns:]


def reference_attention_mass(q, counted, view_k, view_length, k_new, new_valid, scale):
    """The contract of `attention_mass`, from `reference_attention`'s probabilities (one float32 softmax
    over the concatenated keys): summed over the counted queries and each KV head's query heads."""
    batch, q_heads = q.shape[:2]
    kv_heads, columns = view_k.shape[1], view_k.shape[2]
    if k_new is None:
        k_new = view_k.new_zeros(batch, kv_heads, 0, view_k.shape[3])
    probs = reference_probabilities(q, new_valid, view_k, view_length, k_new, scale)
    probs = probs * counted[:, None, :, None]
    mass = probs.sum(2).view(batch, kv_heads, q_heads // kv_heads, -1).sum(2)
    return mass[..., :columns], mass[..., columns:]


def reference_probabilities(q, q_valid, view_k, view_length, k_new, scale):
    """`[B, Hq, T, C + new]` float32: each real query's softmax over the first `view_length[b, h]` rows of
    its KV head's view and the real new columns at or before its own (zero rows for padding queries
    and queries that see nothing)."""
    batch, q_heads, length, dim = q.shape
    kv_heads, columns, new = view_k.shape[1], view_k.shape[2], k_new.shape[2]
    valid = torch.ones(batch, length, dtype=torch.bool) if q_valid is None else q_valid.cpu()
    keys = torch.cat([view_k, k_new], 2).float().repeat_interleave(q_heads // kv_heads, 1)
    old = torch.arange(columns)[None, None, None, :] < view_length.cpu()[:, :, None, None]  # [B, H, 1, C]
    old = old.expand(batch, kv_heads, length, columns)
    causal = torch.ones(length, new, dtype=torch.bool).tril()  # new columns are this forward's queries
    fresh = (causal[None] & valid[:, None, :new])[:, None].expand(batch, kv_heads, length, new)
    visible = torch.cat([old, fresh], 3).repeat_interleave(q_heads // kv_heads, 1).to(q.device)
    logits = (q.float() @ keys.transpose(-1, -2)) * scale
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    return probs * valid.to(q.device)[:, None, :, None]


def reference_attention(q, q_valid, view_k, view_v, view_length, k_new, v_new, scale):
    """The contract, in plain torch: each real query attends, in one float32 softmax, to the first
    `view_length[b, h]` rows of its KV head's view and to the real new columns at or before its own;
    a padding query (or one that sees nothing) outputs zeros. `k_new`/`v_new` may have zero columns
    when the new tokens are already in the view (decode)."""
    kv_heads = view_k.shape[1]
    probs = reference_probabilities(q, q_valid, view_k, view_length, k_new, scale)
    values = torch.cat([view_v, v_new], 2).float().repeat_interleave(q.shape[1] // kv_heads, 1)
    return (probs @ values).to(q.dtype)
