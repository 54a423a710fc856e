"""The engine on a GPU at a real width in bf16 (Triton decode attention and select kernels inside):
a 2-layer Qwen3-VL-8B-shaped model matches transformers' DynamicCache at full budget (tolerance:
low_precision.py) and keeps its bound with eviction. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from helpers import image_chat, random_image, randomize_gates
from low_precision import assert_logits_close, first_divergence

import dbtrimkv
from dbtrimkv.loading import shapes
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.modeling.transformers_compat import cache_kwargs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_engine_matches_dynamic_cache_and_evicts_on_cuda():
    with torch.device("cuda"):
        plain, processor = shapes.build_model("qwen3-vl-8b", num_layers=2, vision_depth=2, dtype=torch.bfloat16)
        gated, _ = shapes.build_model("qwen3-vl-8b", num_layers=2, vision_depth=2, dtype=torch.bfloat16)
    dbtrimkv.attach_retention_gates(gated)
    randomize_gates(gated)
    chats = [image_chat(random_image(1), "Hi?"), image_chat(random_image(2, 96, 128), "What is in this picture?")]
    inputs = build_inputs(processor, chats).to("cuda")
    kwargs = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref = plain.generate(**inputs, **kwargs)
    cache = dbtrimkv.DBTrimKVCache(gated, dbtrimkv.DBTrimKVConfig())
    out = gated.generate(**inputs, **kwargs, **cache_kwargs(cache))
    agree = first_divergence(out.sequences, ref.sequences, ref.logits, torch.bfloat16)
    assert agree >= 1
    assert_logits_close(out.logits, ref.logits, torch.bfloat16, agree)
    bounded = dbtrimkv.DBTrimKVCache(gated, dbtrimkv.DBTrimKVConfig(memory_size=16, buffer_size=8))
    dbtrimkv.generate(gated, inputs, bounded, max_new_tokens=24, prefill_chunk=32, do_sample=False)
    assert bounded.num_evictions >= 2
    for b in range(2):
        assert bounded.num_entries(b) <= bounded.budget + bounded.segments_per_sequence * 32
