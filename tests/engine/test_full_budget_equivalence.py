"""With a budget that holds everything, the engine reproduces HF's DynamicCache + sdpa exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import image_chat, mixed_chats, plain_and_gated, random_image

import dbtrimkv
from dbtrimkv.generation import generate, prefill
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.modeling.transformers_compat import cache_kwargs

STEPS = 16


def _generate(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("variant, kind", [("qwen3_vl", "image"), ("qwen3_vl", "video"), ("qwen3_vl_moe", "image"),
                                           ("qwen3", "text")])
@pytest.mark.parametrize("budget", [None, 10**6])
def test_logits_and_tokens_match_dynamic_cache(variant, kind, budget):
    plain, gated, processor = plain_and_gated(variant)
    inputs = build_inputs(processor, mixed_chats(kind))
    assert (inputs["attention_mask"][:, 0] == 0).any()  # batch of 2 with left padding
    ref = _generate(plain, inputs)
    cache = dbtrimkv.DBTrimKVCache(gated, dbtrimkv.DBTrimKVConfig(budget=budget))
    out = _generate(gated, inputs, **cache_kwargs(cache))
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.logits) == len(ref.logits) == STEPS
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        assert (a - b).abs().max().item() <= 1e-4, f"step {step}"
    assert cache.evicted_entries == 0
    seen = inputs["attention_mask"].sum(1) + STEPS - 1
    for b in range(2):
        assert cache.num_entries(b) == int(seen[b]) * cache.segments_per_sequence


def test_gates_alone_do_not_change_the_model():
    plain, gated, processor = plain_and_gated("qwen3_vl")
    inputs = build_inputs(processor, mixed_chats("image"))
    with torch.no_grad():
        assert torch.allclose(plain(**inputs).logits, gated(**inputs).logits, atol=1e-6)


@pytest.mark.parametrize("variant, kind", [("qwen3_vl", "video"), ("qwen3_vl", "image"), ("qwen3", "text")])
@pytest.mark.parametrize("chunk", [1, 5, 13])
def test_chunked_prefill_matches_one_shot(variant, kind, chunk):
    plain, gated, processor = plain_and_gated(variant)
    inputs = build_inputs(processor, mixed_chats(kind))
    with torch.no_grad():
        one_shot = plain(**inputs).logits[:, -1]
    cache = dbtrimkv.DBTrimKVCache(gated, dbtrimkv.DBTrimKVConfig())
    logits = prefill(gated, inputs, cache, chunk=chunk)
    assert (logits - one_shot).abs().max().item() <= 1e-4
    assert cache.get_seq_length() == inputs["input_ids"].shape[1]
    assert cache.seen == inputs["attention_mask"].sum(1).tolist()


@pytest.mark.parametrize("variant, kind", [("qwen3_vl", "video"), ("qwen3", "text")])
def test_generate_helper_matches_hf_generate(variant, kind):
    plain, gated, processor = plain_and_gated(variant)
    inputs = build_inputs(processor, mixed_chats(kind))
    ref = plain.generate(**inputs, max_new_tokens=10, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    cache = dbtrimkv.DBTrimKVCache(gated, dbtrimkv.DBTrimKVConfig(prefill_chunk=7))
    out = generate(gated, inputs, cache, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, ref)


def test_second_turn_continues_the_cache():
    """A new turn appended to a cache equals prefilling the whole conversation at once."""
    plain, gated, processor = plain_and_gated("qwen3_vl")
    first = [image_chat(random_image(5), "What is this?")]
    cache = dbtrimkv.DBTrimKVCache(gated, dbtrimkv.DBTrimKVConfig(prefill_chunk=6))
    answer = generate(gated, build_inputs(processor, first), cache, max_new_tokens=4, do_sample=False)
    reply = processor.tokenizer.decode(answer[0])
    second_turn = [{"role": "user", "content": [{"type": "image", "image": random_image(6)},
                                                 {"type": "text", "text": "And this one?"}]}]
    follow = generate(gated, build_inputs(processor, second_turn), cache, max_new_tokens=4, do_sample=False)
    # reference: the whole token history in one forward, in the plain model
    history = cache.known_tokens(1, torch.device("cpu"))[0]
    full = build_inputs(processor, first)
    second = build_inputs(processor, second_turn)
    ids = torch.cat([full["input_ids"], answer, second["input_ids"]], 1)
    assert torch.equal(history[:, : ids.shape[1]], ids)
    types = torch.cat([full["mm_token_type_ids"], torch.zeros_like(answer), second["mm_token_type_ids"]], 1)
    ref = plain.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
        pixel_values=torch.cat([full["pixel_values"], second["pixel_values"]]),
        image_grid_thw=torch.cat([full["image_grid_thw"], second["image_grid_thw"]]),
        max_new_tokens=4, do_sample=False,
    )[:, ids.shape[1]:]
    assert reply is not None
    assert torch.equal(follow, ref)
