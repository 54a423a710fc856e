"""With eviction, the engine's logits equal a dense reference that masks the evicted entries."""

from __future__ import annotations

import pytest
import torch
from helpers import image_chat, random_image, randomize_gates
from masked_reference import MaskedReference

import dbtrimkv
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.loading.tiny import build_tiny
from dbtrimkv.modeling.transformers_compat import cache_kwargs

STEPS = 20


def _gated(variant, seed):
    model, processor = build_tiny(variant)
    dbtrimkv.attach_retention_gates(model, intermediate_size=32)
    randomize_gates(model, seed=seed)
    return model, processor


@pytest.mark.parametrize(
    "variant, chats, memory_size, buffer_size, policy, lookahead",
    [
        ("qwen3", ["A short prompt about memory."], 4, 3, "global", 1),
        ("qwen3", ["Hi", "A second, longer prompt in the same batch."], 3, 2, "global", 1),
        ("qwen3", ["Heads keep their own budgets here."], 4, 2, "head", 1),
        ("qwen3_vl", [image_chat(random_image(7), "Look at it.")], 5, 4, "global", 4),
        ("qwen3_vl", [image_chat(random_image(8), "A"), image_chat(random_image(9, 96, 128), "Longer question?")],
         6, 3, "global", 1),
    ],
)
def test_logits_equal_masked_dense_reference(variant, chats, memory_size, buffer_size, policy, lookahead):
    engine_model, processor = _gated(variant, seed=11)
    reference_model, _ = _gated(variant, seed=11)
    inputs = build_inputs(processor, chats)
    config = dbtrimkv.DBTrimKVConfig(memory_size=memory_size, buffer_size=buffer_size, policy=policy,
                                     lookahead=lookahead)
    cache = dbtrimkv.DBTrimKVCache(engine_model, config)
    reference = MaskedReference(reference_model, cache.budget, buffer_size, group=policy, lookahead=lookahead)
    kwargs = dict(max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    out = engine_model.generate(**inputs, **cache_kwargs(cache), **kwargs)
    ref = reference_model.generate(**inputs, **kwargs)
    assert cache.num_evictions >= 2 and reference.evictions >= 2  # eviction really happened
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        assert (a - b).abs().max().item() <= 1e-4, f"step {step}"
    assert torch.equal(out.sequences, ref.sequences)
    for b in range(len(chats)):
        kept = cache.retained_positions(b)
        want = {(l, h, p) for (l, h, p) in reference.alive[b]}
        got = {(l, h, int(p)) for l in range(len(kept)) for h in range(len(kept[l])) for p in kept[l][h]}
        assert got == want
