"""Only the gates learn: after backward, gradients exist on gate parameters and nowhere else."""

from __future__ import annotations

import pytest
import torch
from training_helpers import gated_model

from dbtrimkv.modeling.gates import gate_parameters
from dbtrimkv.inputs.prompts import tokenizer_of
from dbtrimkv.training.collate import Collator
from dbtrimkv.training.data import ChatDataset, read_chats
from dbtrimkv.training.model import assert_only_gates_trainable
from dbtrimkv.training.objective import GateDistiller


def one_batch(processor, chats_path, size=3):
    dataset = ChatDataset(read_chats(chats_path), processor, max_length=128)
    return Collator(tokenizer_of(processor).pad_token_id)([dataset[i] for i in range(size)])


def gate_gradients(variant, chats_path, gradient_checkpointing=False):
    model, processor = gated_model(variant, gradient_checkpointing)
    out = GateDistiller(model, memory_size=4, capacity_mode="head")(one_batch(processor, chats_path))
    out["loss"].backward()
    return model, out


@pytest.mark.parametrize("variant, chats", [("tiny", "image_chats"), ("tiny-text", "text_chats")])
def test_gradients_only_on_gates(variant, chats, request):
    model, out = gate_gradients(variant, request.getfixturevalue(chats))
    gates = {id(p) for p in gate_parameters(model).values()}
    base = [(name, p) for name, p in model.named_parameters() if id(p) not in gates]
    assert base and all(not p.requires_grad and p.grad is None for _, p in base)
    for name, p in gate_parameters(model).items():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
    assert out["capacity"] > 0 and out["kl"] >= 0 and out["ntp"] > 0


def test_gradient_checkpointing_gives_the_same_gradients(image_chats):
    plain, _ = gate_gradients("tiny", image_chats)
    checkpointed, _ = gate_gradients("tiny", image_chats, gradient_checkpointing=True)
    assert checkpointed.training and any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    expected = gate_parameters(plain)
    for name, p in gate_parameters(checkpointed).items():
        torch.testing.assert_close(p.grad, expected[name].grad, rtol=1e-5, atol=1e-8)


def test_a_trainable_base_parameter_is_refused():
    model, _ = gated_model("tiny-text")
    next(p for n, p in model.named_parameters() if "retention_gate" not in n).requires_grad_(True)
    with pytest.raises(RuntimeError, match="only the retention gates"):
        assert_only_gates_trainable(model)


def test_video_chats_train_too():
    from helpers import random_image

    model, processor = gated_model("tiny")
    frames = [random_image(seed, 48, 64) for seed in range(4)]
    chat = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "Noise."}]
    example = ChatDataset([chat], processor, max_length=256)[0]
    batch = Collator(tokenizer_of(processor).pad_token_id)([example, example])
    assert batch["model_inputs"]["video_grid_thw"].shape == (2, 3)
    out = GateDistiller(model, memory_size=4)(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(p.grad is not None for p in gate_parameters(model).values())
