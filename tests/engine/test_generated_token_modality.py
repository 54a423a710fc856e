"""A generated token is text, whatever its id: `retained_by_modality` never counts a generated
`<|image_pad|>` / `<|video_pad|>` as an image or video entry (found by tests/property)."""

from __future__ import annotations

import pytest
import torch
from helpers import image_chat, random_image
from transformers import LogitsProcessor, LogitsProcessorList

import dbtrimkv
from dbtrimkv.generation import generate
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.loading.tiny import build_tiny
from dbtrimkv.modeling.transformers_compat import cache_kwargs


class Force(LogitsProcessor):
    def __init__(self, token_id):
        self.token_id = token_id

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token_id] = 0
        return forced


@pytest.fixture(scope="module")
def gated_vl():
    model, processor = build_tiny("qwen3_vl")
    dbtrimkv.attach_retention_gates(model, intermediate_size=16)
    return model, processor


@pytest.mark.parametrize("pad", ["image_token_id", "video_token_id"])
def test_generated_placeholder_ids_are_text(gated_vl, pad):
    model, processor = gated_vl
    cache = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig())
    inputs = build_inputs(processor, image_chat(random_image(0), "What?"))
    image_tokens = int((inputs["mm_token_type_ids"] == 1).sum())
    generate(model, inputs, cache, max_new_tokens=5,
             logits_processor=LogitsProcessorList([Force(getattr(model.config, pad))]))
    lh = cache.segments_per_sequence
    assert cache.retained_by_modality(0) == {"text": cache.num_entries(0) - image_tokens * lh,
                                             "image": image_tokens * lh, "video": 0}


def test_placeholders_with_their_pixels_are_still_visual(gated_vl):
    """A plain `model(**inputs)` call that carries the pixels records its image tokens as image."""
    model, processor = gated_vl
    cache = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig())
    inputs = build_inputs(processor, image_chat(random_image(0), "What?"))
    with torch.no_grad():
        model(**inputs, **cache_kwargs(cache))
        model(input_ids=torch.tensor([[model.config.image_token_id]]), **cache_kwargs(cache))  # no pixels: text
    image_tokens = int((inputs["mm_token_type_ids"] == 1).sum())
    assert cache.retained_by_modality(0)["image"] == image_tokens * cache.segments_per_sequence
