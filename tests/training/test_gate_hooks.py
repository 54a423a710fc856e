"""Training-only gate hooks: a stretched horizon (`decay_scale`) and a gradient floor through saturated gates."""

from __future__ import annotations

import pytest
import torch
from test_gradients import one_batch
from training_helpers import gated_model

from dbtrimkv.modeling.gates import gate_parameters, text_attention_modules
from dbtrimkv.training.capacity import capacity_loss
from dbtrimkv.training.model import training_gate_hooks
from dbtrimkv.training.objective import GateDistiller


def _log_betas(distiller) -> torch.Tensor:
    return torch.stack([distiller.state.log_beta[i] for i in range(len(text_attention_modules(distiller.model)))])


def test_decay_scale_multiplies_log_beta_in_attention_and_capacity(image_chats):
    model, processor = gated_model("tiny")
    batch = one_batch(processor, image_chats)
    distiller = GateDistiller(model, memory_size=4, capacity_mode="global")
    plain = distiller(batch)
    plain_beta = _log_betas(distiller).detach()
    handles = training_gate_hooks(model, decay_scale=10.0)
    scaled = distiller(batch)
    scaled_beta = _log_betas(distiller).detach()
    # layer 0 reads the same hidden states; later layers see the scaled decay in the attention before them
    torch.testing.assert_close(scaled_beta[0], 10.0 * plain_beta[0])
    assert not torch.allclose(scaled_beta[1:], 10.0 * plain_beta[1:], rtol=0, atol=1e-6)
    expected = capacity_loss(scaled_beta, batch["positions"], batch["valid"], 4, "global").loss
    torch.testing.assert_close(scaled["capacity"], expected)
    assert not torch.isclose(expected, plain["capacity"])
    assert not torch.isclose(scaled["kl"], plain["kl"])  # the student's attention decays ten times faster
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(distiller(batch)["kl"], plain["kl"])  # removed: back to the plain gates


def _bias_gradient(image_chats, saturation_grad: float) -> tuple[torch.Tensor, torch.Tensor]:
    model, processor = gated_model("tiny")
    gate = text_attention_modules(model)[0].retention_gate
    with torch.no_grad():
        gate.bias.fill_(200.0)  # logsigmoid(200) is 0 in float32: every entry kept forever
    training_gate_hooks(model, saturation_grad=saturation_grad)
    distiller = GateDistiller(model, memory_size=1, capacity_mode="global")
    out = distiller(one_batch(processor, image_chats))
    out["loss"].backward()
    return gate_parameters(model)[next(n for n in gate_parameters(model) if n.endswith("retention_gate.bias"))].grad, \
        _log_betas(distiller).detach()


def test_saturation_grad_reaches_saturated_gates_without_changing_values(image_chats):
    stuck, beta_stuck = _bias_gradient(image_chats, 0.0)
    moving, beta_moving = _bias_gradient(image_chats, 0.01)
    assert torch.all(beta_stuck == 0) and torch.equal(beta_stuck, beta_moving)  # same values, saturated
    assert torch.all(stuck == 0)  # no gradient reaches a saturated logit
    assert torch.all(moving > 0)  # with the floor, the capacity loss pushes the logits (and so the bias) down


def test_neutral_settings_install_nothing():
    model, _ = gated_model("tiny")
    assert training_gate_hooks(model) == []
