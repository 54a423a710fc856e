"""bf16 and fp16 end to end: the engine against transformers (DynamicCache + sdpa) at full budget and
against the dense masked reference with eviction, in the same dtype (tolerances: low_precision.py).

Covered paths: image and video prompts (deepstack on), the MoE variant, a text-only model, a batch
of two with left padding, chunked prefill, decode. The K/V pool is stored in the model dtype, the
retention scores (log beta and the eviction scores) in float32.
"""

from __future__ import annotations

import pytest
import torch
from helpers import image_chat, mixed_chats, plain_and_gated, random_image, randomize_gates
from low_precision import assert_logits_close, first_divergence
from masked_reference import MaskedReference

import dbtrimkv
from dbtrimkv.generation import prefill
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.loading.tiny import build_tiny
from dbtrimkv.modeling.transformers_compat import cache_kwargs

STEPS = 12
DTYPES = [torch.bfloat16, torch.float16]


def _generate(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant, kind", [("qwen3_vl", "image"), ("qwen3_vl", "video"), ("qwen3_vl_moe", "image"),
                                           ("qwen3", "text")])
def test_full_budget_matches_dynamic_cache(variant, kind, dtype):
    plain, gated, processor = plain_and_gated(variant, dtype)
    inputs = build_inputs(processor, mixed_chats(kind))
    assert (inputs["attention_mask"][:, 0] == 0).any()  # left padding in the batch
    ref = _generate(plain, inputs)
    cache = dbtrimkv.DBTrimKVCache(gated, dbtrimkv.DBTrimKVConfig())
    out = _generate(gated, inputs, **cache_kwargs(cache))
    agree = first_divergence(out.sequences, ref.sequences, ref.logits, dtype)
    assert agree >= 1
    assert_logits_close(out.logits, ref.logits, dtype, agree)
    assert cache.pool.k.dtype == cache.pool.v.dtype == dtype
    assert cache.pool.log_beta.dtype == torch.float32
    assert cache.evicted_entries == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant, kind, chunk", [("qwen3_vl", "video", 5), ("qwen3_vl", "image", 13), ("qwen3", "text", 4)])
def test_chunked_prefill_matches_one_shot(variant, kind, chunk, dtype):
    from low_precision import logit_tolerance

    plain, gated, processor = plain_and_gated(variant, dtype)
    inputs = build_inputs(processor, mixed_chats(kind))
    with torch.no_grad():
        one_shot = plain(**inputs).logits[:, -1]
    cache = dbtrimkv.DBTrimKVCache(gated, dbtrimkv.DBTrimKVConfig())
    logits = prefill(gated, inputs, cache, chunk=chunk)
    assert float((logits.float() - one_shot.float()).abs().max()) <= logit_tolerance(one_shot, dtype)
    assert cache.seen == inputs["attention_mask"].sum(1).tolist()


@pytest.mark.parametrize(
    "variant, chats, memory_size, buffer_size, dtype",
    [
        ("qwen3", ["Hi", "A second, longer prompt in the same batch."], 3, 2, torch.bfloat16),
        ("qwen3", ["Hi", "A second, longer prompt in the same batch."], 3, 2, torch.float16),
        ("qwen3_vl", [image_chat(random_image(8), "A"), image_chat(random_image(9, 96, 128), "Longer question?")], 6, 3,
         torch.bfloat16),
    ],
)
def test_eviction_matches_masked_reference(variant, chats, memory_size, buffer_size, dtype):
    """Same dtype on both sides: the engine's pool (dtype K/V, float32 scores) keeps the entries the
    brute-force rule keeps, and attends like a dense model that masks the evicted ones."""
    engine_model, processor = build_tiny(variant, dtype=dtype)
    reference_model, _ = build_tiny(variant, dtype=dtype)
    for model in (engine_model, reference_model):
        dbtrimkv.attach_retention_gates(model, intermediate_size=32)
        randomize_gates(model, seed=11)
    inputs = build_inputs(processor, chats)
    config = dbtrimkv.DBTrimKVConfig(memory_size=memory_size, buffer_size=buffer_size)
    cache = dbtrimkv.DBTrimKVCache(engine_model, config)
    reference = MaskedReference(reference_model, cache.budget, buffer_size)
    out = _generate(engine_model, inputs, **cache_kwargs(cache))
    ref = _generate(reference_model, inputs)
    assert cache.num_evictions >= 2 and reference.evictions >= 2
    agree = first_divergence(out.sequences, ref.sequences, ref.logits, dtype)
    assert agree >= 1
    assert_logits_close(out.logits, ref.logits, dtype, agree)
    if agree == STEPS:  # same tokens throughout: the same entries survive
        for b in range(len(chats)):
            kept = cache.retained_positions(b)
            got = {(l, h, int(p)) for l in range(len(kept)) for h in range(len(kept[l])) for p in kept[l][h]}
            assert got == reference.alive[b]
    assert cache.pool.k.dtype == dtype and cache.pool.log_beta.dtype == torch.float32
