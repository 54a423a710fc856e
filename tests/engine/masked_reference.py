"""A dense reference engine: full K/V (DynamicCache) plus a mask of evicted entries.

It applies the eviction contract (docs/architecture.md) by brute force (python sort over (layer, head, position)
entries) at the same moments as the engine (before a forward would exceed
budget + L*H*max(buffer, n)), and attends over the full cache with evicted entries masked out.
If the engine's pool, tables, kernels and bookkeeping are right, its logits equal these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import brute_force_keep
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from dbtrimkv.modeling.attention import ATTENTION_CALL_KEY, LazyCausalMask, retention_mask
from dbtrimkv.modeling.gates import text_attention_modules, text_config_of

NAME = "dbtrimkv_test_reference"


class MaskedReference:
    def __init__(self, model, budget: int, buffer_size: int, group: str = "global", lookahead: int = 1):
        text = text_config_of(model)
        self.L, self.H = text.num_hidden_layers, text.num_key_value_heads
        self.budget, self.buffer, self.group, self.lookahead = budget, buffer_size, group, lookahead
        self.seen: list[int] = []
        self.col_pos: list[torch.Tensor] = []  # per forward: [B, q] positions (-1 padding)
        self.log_beta: dict = {}  # (b, layer, head, pos) -> log beta
        self.alive: list[set] = []  # per sequence: set of (layer, head, pos)
        self.evictions = 0
        for module in text_attention_modules(model):
            module._reference = self
        AttentionInterface.register(NAME, reference_attention)
        AttentionMaskInterface.register(NAME, retention_mask)
        model.set_attn_implementation(
            {"text_config": NAME, "vision_config": "sdpa"} if hasattr(model.config, "vision_config") else NAME
        )

    def begin_forward(self, valid: torch.Tensor) -> None:
        batch = valid.shape[0]
        if not self.seen:
            self.seen = [0] * batch
            self.alive = [set() for _ in range(batch)]
        lh = self.L * self.H
        for b in range(batch):
            n = int(valid[b].sum())
            if len(self.alive[b]) + lh * n > self.budget + lh * max(self.buffer, n) and self.alive[b]:
                self._evict(b)
        rank = torch.cumsum(valid.long(), 1) - 1
        seen = torch.tensor(self.seen)[:, None]
        positions = torch.where(valid, seen + rank, torch.full_like(rank, -1))
        self.col_pos.append(positions)
        for b in range(batch):
            self.seen[b] += int(valid[b].sum())

    def _evict(self, b: int) -> None:
        self.evictions += 1
        entries = [(l, h, p, self.log_beta[(b, l, h, p)]) for (l, h, p) in self.alive[b]]
        if self.group == "global":
            kept, _ = brute_force_keep(entries, self.budget, self.seen[b], self.lookahead)
        else:  # head: each (layer, head) keeps budget / (L*H)
            kept = set()
            per = self.budget // (self.L * self.H)
            for l in range(self.L):
                for h in range(self.H):
                    part = [e for e in entries if e[0] == l and e[1] == h]
                    kept |= brute_force_keep(part, per, self.seen[b], self.lookahead)[0]
        self.alive[b] = kept

    def add_layer(self, layer: int, log_beta: torch.Tensor) -> None:
        positions = self.col_pos[-1]
        for b in range(positions.shape[0]):
            for j in range(positions.shape[1]):
                p = int(positions[b, j])
                if p >= 0:
                    for h in range(self.H):
                        self.log_beta[(b, layer, h, p)] = float(log_beta[b, j, h])
                        self.alive[b].add((layer, h, p))


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    ref: MaskedReference = module._reference
    layer = module.layer_idx
    if layer == 0:
        valid = attention_mask.query_padding if isinstance(attention_mask, LazyCausalMask) else None
        if valid is None:
            valid = torch.ones(query.shape[0], query.shape[2], dtype=torch.bool)
        ref.begin_forward(valid.cpu())
    ref.add_layer(layer, kwargs[ATTENTION_CALL_KEY].log_beta)
    key_pos = torch.cat(ref.col_pos, 1)  # [B, all columns]
    q_pos = ref.col_pos[-1]
    batch, heads, cols = key.shape[0], key.shape[1], key.shape[2]
    alive = torch.zeros(batch, heads, cols, dtype=torch.bool)
    for b in range(batch):
        for c in range(cols):
            p = int(key_pos[b, c])
            for h in range(heads):
                alive[b, h, c] = p >= 0 and (layer, h, p) in ref.alive[b]
    visible = alive[:, :, None, :] & (key_pos[:, None, None, :] <= q_pos[:, None, :, None])
    visible = visible.repeat_interleave(query.shape[1] // heads, dim=1)
    has_any = visible.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=visible | ~has_any, scale=scaling,
                                         enable_gqa=True)
    out = torch.where(has_any, out, torch.zeros((), dtype=out.dtype))
    return out.transpose(1, 2).contiguous(), None
