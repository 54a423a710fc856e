"""Retention-biased causal attention: the soft eviction the gates are trained through.

Why: at inference a key `i` is evicted once its decayed score `beta_i^(t-i)` loses the competition
for the budget. That hard choice has no gradient, so training uses the soft version from TRIM-KV:
the query at position `t` sees key `i <= t` with logit `q.k / sqrt(d) + (t - i) * log beta_i`,
where `log beta_i` belongs to the key's KV head. A small beta fades the key out of attention as it
ages, exactly the keys the eviction rule would drop first.

Two implementations of the same function:
- `biased_attention`: plain torch, materialises the `[B, H, Tq, Tk]` logits in float32. For CPU,
  short sequences and as the reference in tests. Grouped-query attention is computed per KV
  group (no repeated K/V); `mask` is a boolean mask, True where the query may attend.
- `biased_flex_attention`: FlexAttention with a `score_mod` adding the bias inside the fused
  kernel, so the `T x T` logits never exist in memory; the gradient of the captured `log beta`
  is accumulated by the kernel. Compiled on CUDA. `block_mask` is a FlexAttention `BlockMask`.

Both take query `[B, Hq, Tq, D]`, key/value `[B, Hkv, Tk, D]`, `log_beta` `[B, Tk, Hkv]` and return
`[B, Hq, Tq, D]`. Query `j` sits at position `j + Tk - Tq`.
"""

from __future__ import annotations

import functools

import torch


def biased_attention(query, key, value, log_beta, mask, scaling: float):
    """Dense reference path. `mask`: bool, broadcastable to `[B, 1, Tq, Tk]` (None = causal)."""
    b, hq, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    groups = hq // hkv
    q = query.view(b, hkv, groups, tq, d)
    scores = torch.matmul(q, key.unsqueeze(2).transpose(-1, -2)).float() * scaling  # [B, Hkv, G, Tq, Tk]
    rows = torch.arange(tq, device=query.device) + (tk - tq)
    age = (rows[:, None] - torch.arange(tk, device=query.device)[None, :]).clamp(min=0)
    scores = scores + (age * log_beta.transpose(1, 2)[:, :, None, :].float()).unsqueeze(2)
    if mask is None:
        mask = (rows[:, None] >= torch.arange(tk, device=query.device)[None, :])[None, None]
    # A large finite fill keeps fully masked (padding) rows finite: their output is never used.
    scores = scores.masked_fill(~mask.unsqueeze(2), torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value.unsqueeze(2)).view(b, hq, tq, d)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def biased_flex_attention(query, key, value, log_beta, block_mask, scaling: float, compiled: bool | None = None):
    """FlexAttention path; `compiled=None` compiles on CUDA and runs eagerly elsewhere (tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    hq, hkv = query.shape[1], key.shape[1]
    groups = hq // hkv
    offset = key.shape[2] - query.shape[2]
    lb = log_beta.transpose(1, 2).float().contiguous()  # [B, Hkv, Tk]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + (q_idx + offset - kv_idx) * lb[b, h // groups, kv_idx]

    compiled = query.is_cuda if compiled is None else compiled
    attend = _compiled_flex() if compiled else flex_attention
    return attend(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                  enable_gqa=groups > 1)
