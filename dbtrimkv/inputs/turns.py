"""The tokens around a chat turn that both the pipeline's conversations and the server's sessions need.

Why: a conversation that continues from a kept cache must feed exactly the tokens a one-shot prompt
of the whole history would hold: which ids end a reply, what closes a reply before the next turn's
template, and how those ids go in front of the next turn's processor outputs. `DBTrimKVPipeline`'s
`Conversation` and the server's sessions (`serving/app.py`) use these one definitions, and the
server imports them from here rather than from the user-facing `pipeline.py`.
"""

from __future__ import annotations

import torch


def stop_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids of the model's generation config and tokenizer."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    return (ids | {tokenizer.eos_token_id}) - {None}


def closing_ids(tokenizer, last_ids: list[int], stop: set[int]) -> list[int]:
    """Tokens that close an assistant reply before the next turn's template: a newline after an
    end-of-sequence token, else the end-of-sequence token too (the reply was cut off)."""
    ended = bool(last_ids) and last_ids[-1] in stop
    return tokenizer.encode("\n" if ended else tokenizer.eos_token + "\n", add_special_tokens=False)


def prepend_tokens(inputs, ids: list[int]) -> dict:
    """Processor outputs (one sequence) with text tokens `ids` in front."""
    prefix = torch.tensor([ids], dtype=inputs["input_ids"].dtype)
    out = dict(inputs)
    out["input_ids"] = torch.cat([prefix, inputs["input_ids"]], 1)
    out["attention_mask"] = torch.cat([torch.ones_like(prefix), inputs["attention_mask"]], 1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([torch.zeros_like(prefix), inputs["mm_token_type_ids"]], 1)
    return out
