"""`GateDistiller`: one training step's forward pass, teacher and student, as an `nn.Module`.

Why a module: `accelerate` (DDP on several GPUs) synchronises gradients through the forward of the
module it wraps, so the whole objective (teacher pass under `no_grad`, student pass, the losses)
runs inside `forward` and the loop only calls `accelerator.backward(out["loss"])`.

Loss = base loss (`fwkl` or `fwkl_ntp`, on response tokens) + `capacity_weight` * capacity loss
(on the gates' `log beta` of every layer, over all real tokens). The language model's final
hidden states are taken from the inner model and projected by the LM head only at the loss
positions (see `distill.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.gates import text_attention_modules
from ..modeling.model_state import model_state
from .train_attention import teacher_attention
from .capacity import capacity_loss
from .distill import distillation_losses


class GateDistiller(nn.Module):
    def __init__(self, model, memory_size: int, capacity_mode: str = "global", loss_kind: str = "fwkl_ntp",
                 capacity_weight: float = 1.0, logits_chunk: int = 1024, capacity_chunk: int | None = None):
        super().__init__()
        self.model = model
        self.state = model_state(model)  # the gates' last output per layer: `state.log_beta`
        self.memory_size = memory_size
        self.capacity_mode = capacity_mode
        self.loss_kind = loss_kind
        self.capacity_weight = capacity_weight
        self.logits_chunk = logits_chunk
        self.capacity_chunk = capacity_chunk

    def _hidden(self, inputs: dict) -> torch.Tensor:
        return self.model.model(**inputs, use_cache=False).last_hidden_state

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        inputs, where = batch["model_inputs"], batch["loss_mask"]
        with torch.no_grad(), teacher_attention(self.model):
            teacher = self._hidden(inputs)[where]
        student = self._hidden(inputs)
        log_beta = torch.stack([self.state.log_beta[i] for i in range(len(text_attention_modules(self.model)))])
        distill = distillation_losses(self.model.get_output_embeddings(), student[where], teacher,
                                      batch["targets"][where], self.logits_chunk)
        capacity = capacity_loss(log_beta, batch["positions"], batch["valid"], self.memory_size,
                                 self.capacity_mode, self.capacity_chunk)
        base = distill.loss(self.loss_kind)
        return {
            "loss": base + self.capacity_weight * capacity.loss,
            "kl": distill.kl.detach(),
            "ntp": distill.ntp.detach(),
            "capacity": capacity.loss.detach(),
            "mass_ratio": capacity.mean_mass_ratio,
        }
