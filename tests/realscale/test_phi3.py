"""Phi-3-mini-128k, the one non-Qwen base of the released checkpoints: fused qkv_proj, 32 KV heads of
head_dim 96 (no GQA), no q/k norm, LongRoPE. The engine must reproduce transformers on it, not
merely run: full budget vs DynamicCache, eviction vs the dense masked reference, and LongRoPE's
short/long switch at `original_max_position_embeddings` under chunked prefill."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_gates
from masked_reference import MaskedReference

import dbtrimkv
from dbtrimkv.loading import shapes
from dbtrimkv.generation import generate, prefill
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.modeling.transformers_compat import cache_kwargs

PROMPTS = ["Hello there", "A longer prompt about the phi three model and its caches."]
KW = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def phi3_real_width():
    """Two layers at the real width (hidden 3072, 32 heads x 96), float32, small vocabulary."""
    plain, tokenizer = shapes.build_model("phi-3-mini-128k", num_layers=2, vocab_size=1024, dtype=torch.float32)
    gated, _ = shapes.build_model("phi-3-mini-128k", num_layers=2, vocab_size=1024, dtype=torch.float32)
    dbtrimkv.attach_retention_gates(gated, gate_type="rg", intermediate_size=64)
    randomize_gates(gated, seed=3)
    return plain, gated, tokenizer


def test_shape_is_phi3(phi3_real_width):
    plain, gated, _ = phi3_real_width
    attn = gated.model.layers[0].self_attn
    assert hasattr(attn, "qkv_proj") and not hasattr(attn, "q_proj")  # fused projection
    assert attn.head_dim == 96 and gated.config.num_key_value_heads == 32
    assert gated.config.rope_parameters["rope_type"] == "longrope"


def test_full_budget_matches_dynamic_cache(phi3_real_width):
    plain, gated, tokenizer = phi3_real_width
    inputs = build_inputs(tokenizer, PROMPTS)
    assert (inputs["attention_mask"][:, 0] == 0).any()
    ref = plain.generate(**inputs, max_new_tokens=8, **KW)
    cache = dbtrimkv.DBTrimKVCache(gated, dbtrimkv.DBTrimKVConfig())
    out = gated.generate(**inputs, max_new_tokens=8, **KW, **cache_kwargs(cache))
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert (a - b).abs().max().item() <= 1e-4
    assert cache.segments_per_sequence == 2 * 32 and cache.head_dim == 96


def test_eviction_matches_masked_reference(phi3_real_width):
    _, gated, tokenizer = phi3_real_width
    reference_model, _ = shapes.build_model("phi-3-mini-128k", num_layers=2, vocab_size=1024, dtype=torch.float32)
    dbtrimkv.attach_retention_gates(reference_model, gate_type="rg", intermediate_size=64)
    randomize_gates(reference_model, seed=3)
    inputs = build_inputs(tokenizer, PROMPTS[1:])
    config = dbtrimkv.DBTrimKVConfig(memory_size=6, buffer_size=3)
    cache = dbtrimkv.DBTrimKVCache(gated, config)
    reference = MaskedReference(reference_model, cache.budget, 3)
    out = gated.generate(**inputs, max_new_tokens=10, **KW, **cache_kwargs(cache))
    ref = reference_model.generate(**inputs, max_new_tokens=10, **KW)
    assert cache.num_evictions >= 2 and reference.evictions >= 2
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert (a - b).abs().max().item() <= 1e-4
    kept = cache.retained_positions(0)
    assert {(l, h, int(p)) for l in range(2) for h in range(32) for p in kept[l][h]} == reference.alive[0]


def _narrow_phi3(original_max: int = 48):
    """Phi-3 with the real head_dim (96, so the real 48 LongRoPE factors) and the real ratio
    max/original positions (32x, so the same attention factor), but 2 heads and a short original
    context, so prompts can cross the short/long switch in a test."""
    from transformers import AutoModelForCausalLM, Phi3Config

    text = dict(shapes.load_shape("phi-3-mini-128k")["text"])
    text.update(hidden_size=192, intermediate_size=256, num_attention_heads=2, num_key_value_heads=2,
                num_hidden_layers=2, vocab_size=512, original_max_position_embeddings=original_max,
                max_position_embeddings=32 * original_max, sliding_window=None, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
    config = Phi3Config(**text)
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config).eval()
    torch.manual_seed(0)
    gated = AutoModelForCausalLM.from_config(config).eval()
    dbtrimkv.attach_retention_gates(gated, gate_type="rg", intermediate_size=16)
    return plain, gated


@pytest.mark.parametrize("length", [40, 80])  # below and beyond original_max_position_embeddings (48)
def test_longrope_chunked_prefill_matches_one_forward(length):
    plain, gated = _narrow_phi3()
    ids = torch.randint(3, 512, (1, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        one_forward = plain(input_ids=ids).logits[:, -1]
    cache = dbtrimkv.DBTrimKVCache(gated, dbtrimkv.DBTrimKVConfig())
    logits = prefill(gated, {"input_ids": ids}, cache, chunk=16)
    assert (logits - one_forward).abs().max().item() <= 1e-4


def test_longrope_decode_across_the_switch_matches_generate():
    """Prompt below the switch, decoding past it: the per-forward rule of transformers, same tokens."""
    plain, gated = _narrow_phi3()
    ids = torch.randint(3, 512, (1, 44), generator=torch.Generator().manual_seed(1))
    ref = plain.generate(input_ids=ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)[:, 44:]
    cache = dbtrimkv.DBTrimKVCache(gated, dbtrimkv.DBTrimKVConfig(prefill_chunk=8))
    out = generate(gated, {"input_ids": ids}, cache, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(out, ref)
