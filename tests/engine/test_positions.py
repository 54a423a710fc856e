"""Decode positions, rope deltas and input defaults: one function each (`dbtrimkv.runner.positions`), used by
`generate` and by the server's engine alike.

Why: Qwen-VL's M-RoPE runs ahead of the text position after an image; a decode step must continue
at `seen + rope_delta`, exactly where the model's own `get_rope_index` would put the next token of
the whole prompt. These tests check that against `get_rope_index` run over the full prompt.
"""

from __future__ import annotations

import torch
from helpers import image_chat, random_image

import dbtrimkv
from dbtrimkv.generation import prefill
from dbtrimkv.runner.positions import decode_positions, rope_deltas, token_positions, with_input_defaults
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.loading.tiny import build_tiny


def test_decode_position_after_an_image_is_where_the_whole_prompt_puts_its_last_token():
    """Prefill all but the last prompt token (a text token, like `generate`): the decode position of the
    next token equals the last column of the whole prompt's positions (text and M-RoPE), and M-RoPE
    really runs behind the text position there (the image's tokens share M-RoPE positions)."""
    model, processor = build_tiny("qwen3_vl")
    dbtrimkv.attach_retention_gates(model, intermediate_size=16)
    chats = [image_chat(random_image(3), "What is in the image?"), image_chat(random_image(4), "Colour?")]
    inputs = with_input_defaults(build_inputs(processor, chats), "cpu")
    mask = inputs["attention_mask"]
    assert not bool(mask.all())  # left-padded batch: the rows see different numbers of tokens
    whole = token_positions(model, inputs, mask, [0, 0], [0, 0])  # [4, B, T]
    cache = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig(prefill_chunk=8))
    prefill(model, inputs, cache, upto=inputs["input_ids"].shape[1] - 1)
    got = decode_positions(model, list(cache.requests), "cpu")
    assert got.shape == (4, 2, 1)
    assert torch.equal(got, whole[..., -1:])
    assert all(row.rope_delta < 0 for row in cache.requests)  # M-RoPE behind text after an image


def test_rope_deltas_skip_rows_without_tokens_and_text_models_get_text_positions():
    positions = torch.tensor([[[0, 1, 2], [0, 0, 0]], [[0, 5, 6], [0, 0, 0]], [[0, 4, 6], [0, 0, 0]],
                              [[0, 3, 6], [0, 0, 0]]])  # [4, B=2, T=3]
    mask = torch.tensor([[0, 1, 1], [0, 0, 0]])
    assert rope_deltas(positions, mask, [3, 0]) == [6 + 1 - 3, None]
    model, _ = build_tiny("qwen3")
    rows = [type("Row", (), {"seen": 7, "rope_delta": 0})(), type("Row", (), {"seen": 2, "rope_delta": 0})()]
    assert torch.equal(decode_positions(model, rows, "cpu"), torch.tensor([[7], [2]]))


def test_input_defaults_fill_only_what_is_missing():
    ids = torch.tensor([[5, 6, 7]])
    filled = with_input_defaults({"input_ids": ids}, "cpu")
    assert torch.equal(filled["attention_mask"], torch.ones_like(ids))
    assert torch.equal(filled["mm_token_type_ids"], torch.zeros_like(ids))
    given = with_input_defaults({"input_ids": ids, "attention_mask": torch.tensor([[0, 1, 1]]),
                                 "mm_token_type_ids": torch.tensor([[0, 1, 0]])}, "cpu")
    assert given["attention_mask"].tolist() == [[0, 1, 1]] and given["mm_token_type_ids"].tolist() == [[0, 1, 0]]


def test_the_runner_keeps_rope_deltas_in_the_request_table_not_on_the_model():
    """After an image, decoding continues from each sequence's own rope delta; transformers'
    `model.model.rope_deltas` is never written (it would be shared by every cache of the model)."""
    model, processor = build_tiny("qwen3_vl")
    dbtrimkv.attach_retention_gates(model, intermediate_size=16)
    assert model.model.rope_deltas is None
    cache = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig(prefill_chunk=8))
    dbtrimkv.generate(model, build_inputs(processor, image_chat(random_image(3), "What?")), cache, max_new_tokens=3,
                      do_sample=False)
    assert model.model.rope_deltas is None
    assert cache.requests[0].rope_delta < 0
