"""`copy.deepcopy` of a gated model: a model of its own, hooks and record included.

Why: researchers copy a model to compare policies or dtypes side by side; the record's lock once made
`deepcopy` fail (`cannot pickle '_thread.RLock'`), and a copy whose hooks still wrote the original's
record would mix the two models' state.
"""

from __future__ import annotations

import copy

import torch
from helpers import randomize_gates

import dbtrimkv
from dbtrimkv.loading.tiny import build_tiny
from dbtrimkv.modeling.model_state import model_state


def test_a_copied_gated_model_is_independent_and_answers_the_same():
    model, _ = build_tiny("qwen3")
    dbtrimkv.attach_retention_gates(model, intermediate_size=16)
    randomize_gates(model, seed=2)
    twin = copy.deepcopy(model)
    assert model_state(twin) is not model_state(model) and model_state(twin).lock is not model_state(model).lock
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    config = dbtrimkv.DBTrimKVConfig(memory_size=3, buffer_size=1)

    def answer(m):
        return dbtrimkv.generate(m, {"input_ids": ids}, dbtrimkv.DBTrimKVCache(m, config), max_new_tokens=6,
                                 do_sample=False)

    want = answer(model)
    assert torch.equal(answer(twin), want)
    randomize_gates(twin, seed=9)  # the copy's gates are its own: the original answers as before
    assert torch.equal(answer(model), want)
    model_state(model).log_beta.clear()
    with torch.no_grad():
        twin(input_ids=ids)  # a plain forward: the hooks hand the gates' outputs to their model's record
    assert model_state(twin).log_beta and not model_state(model).log_beta
    model_state(twin).remove_hooks()
    assert torch.equal(answer(model), want)
