"""No state rides on the model's modules beyond the one typed record (issue 25).

Why: attributes parked on `nn.Module`s between a hook and the attention (a cache reference, the
decoder's column count, the gates' output, the training flags) are invisible coupling: whoever
calls the model next inherits them. dbtrimkv keeps one `ModelState` on the top-level model and
passes per-call data in the attention call's keyword arguments; these tests scan every module after
inference, a plain forward and a training forward (student and teacher).
"""

from __future__ import annotations

import torch
from helpers import image_chat, random_image

import dbtrimkv
from dbtrimkv.modeling.gates import text_attention_modules
from dbtrimkv.generation import generate
from dbtrimkv.modeling.model_state import STATE_ATTRIBUTE, model_state
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.loading.tiny import build_tiny
from dbtrimkv.training.train_attention import (disable_training_attention, enable_training_attention,
                                               teacher_attention)


def side_channels(model) -> list[str]:
    """Every `_dbtrimkv_*` (or gate-output) attribute on a module, but the model's one record."""
    found = []
    for name, module in model.named_modules():
        for attr in vars(module):
            ours = attr.startswith("_dbtrimkv_") or attr == "retention_log_beta"
            if ours and not (module is model and attr == STATE_ATTRIBUTE):
                found.append(f"{name or '<model>'}.{attr}")
    return found


def test_no_dbtrimkv_attribute_on_any_module_after_inference_and_training_forwards():
    model, processor = build_tiny("qwen3_vl")
    dbtrimkv.attach_retention_gates(model, intermediate_size=16)
    inputs = build_inputs(processor, image_chat(random_image(5)))
    cache = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig(budget=64, prefill_chunk=8, buffer_size=0))
    generate(model, inputs, cache, max_new_tokens=3, do_sample=False)
    assert cache.num_evictions > 0  # the hooks really drove the cache
    assert side_channels(model) == [] and model_state(model).log_beta == {}  # a cached forward's log beta: pool only
    with torch.no_grad():
        model(**inputs, use_cache=False)  # no retention cache: plain SDPA through the same hooks
    enable_training_attention(model, "plain")
    with torch.no_grad():
        with teacher_attention(model):
            model(**inputs, use_cache=False)
        model(**inputs, use_cache=False)
    disable_training_attention(model)
    assert side_channels(model) == []
    state = model_state(model)
    layers = len(text_attention_modules(model))
    assert sorted(state.log_beta) == list(range(layers))  # the record holds the last forward's gate outputs
    assert state.log_beta[0].shape[:2] == inputs["input_ids"].shape and state.columns_before is None
    assert state.train_backend is None and not state.teacher


def test_the_scan_finds_a_parked_attribute():
    model, _ = build_tiny("qwen3_vl")
    dbtrimkv.attach_retention_gates(model, intermediate_size=16)
    assert side_channels(model) == []
    text_attention_modules(model)[1]._dbtrimkv_cache_ref = None
    assert side_channels(model) == [f"{dict((m, n) for n, m in model.named_modules())[text_attention_modules(model)[1]]}"
                                    "._dbtrimkv_cache_ref"]
