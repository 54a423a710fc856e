"""A left-padded batch answers as its prompts do one by one, under eviction.

Why: eviction runs before each prefill chunk, so where a prompt is cut decides what it keeps. A
batch once cut its padded columns into chunks, so a row with `p` padding columns was cut `p` tokens
off from where it is cut alone: the same prompt kept other entries (and, with the tiny-recall gates
of stages 2 and 3 averaged, one lmms-eval card prompt answered 9 in a batch and 5 alone). The
runner now cuts each row from its own first token (`PromptBatch.run`).
"""

from __future__ import annotations

import pytest
import torch
from helpers import mixed_chats, plain_and_gated

import dbtrimkv
from dbtrimkv.inputs.prompts import build_inputs


def _run(model, processor, chats, config):
    cache = dbtrimkv.DBTrimKVCache(model, config)
    new = dbtrimkv.generate(model, build_inputs(processor, chats), cache, max_new_tokens=3, do_sample=False)
    kept = [[[sorted(h.tolist()) for h in heads] for heads in cache.retained_positions(b)] for b in range(len(chats))]
    return new, kept, cache.num_evictions


@pytest.mark.parametrize("kind", ["image", "video", "text"])
@pytest.mark.parametrize("policy, buffer", [("global", 0), ("h2o", 0), ("global", 2), ("snapkv", 1)])
def test_each_row_of_a_padded_batch_keeps_and_answers_what_it_would_alone(kind, policy, buffer):
    """(A row whose tokens ran out sits forwards out; if it is over its bound it is evicted then, from the
    state it would be evicted from alone at its next token.)"""
    torch.manual_seed(0)
    _, model, processor = plain_and_gated("qwen3_vl")
    chats = mixed_chats(kind)
    widths = build_inputs(processor, chats)["attention_mask"].sum(1).tolist()
    chunk = next(c for c in (5, 7, 6) if (widths[0] - widths[1]) % c)  # padding that shifts a padded-column cut
    assert len(set(widths)) == 2
    config = dbtrimkv.DBTrimKVConfig(policy=policy, memory_size=4, prefill_chunk=chunk, buffer_size=buffer)
    batched, kept, evictions = _run(model, processor, chats, config)
    assert evictions > 2
    for b, chat in enumerate(chats):
        alone, alone_kept, _ = _run(model, processor, [chat], config)
        assert kept[b] == alone_kept[0]
        assert batched[b].tolist()[: alone.shape[1]] == alone[0].tolist()


def test_prefill_returns_each_rows_logits_after_its_own_last_token():
    """`dbtrimkv.prefill` over a padded batch: row b's logits are those of its prompt prefilled alone
    (the shorter row's last chunk ends forwards before the longer row's)."""
    torch.manual_seed(0)
    _, model, processor = plain_and_gated("qwen3_vl")
    chats = mixed_chats("text")
    config = dbtrimkv.DBTrimKVConfig(memory_size=4, prefill_chunk=3, buffer_size=0)
    cache = dbtrimkv.DBTrimKVCache(model, config)
    logits = dbtrimkv.prefill(model, build_inputs(processor, chats), cache)
    inputs = build_inputs(processor, chats)
    assert cache.get_seq_length() == inputs["input_ids"].shape[1]  # columns, as transformers counts them
    for b, chat in enumerate(chats):
        alone = dbtrimkv.prefill(model, build_inputs(processor, [chat]), dbtrimkv.DBTrimKVCache(model, config))
        torch.testing.assert_close(logits[b], alone[0], rtol=1e-4, atol=1e-5)
