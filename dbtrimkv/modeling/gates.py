"""Retention gates and `attach_retention_gates`.

Why: each text attention layer gets a small MLP that reads the token's hidden state (the input of
self-attention, after the input layernorm) and predicts, per KV head, `log beta` in (-inf, 0]: how
slowly the token's importance decays. Modules sit at `self_attn.retention_gate`, so state-dict
names match the released TrimKV / DBTrimKV checkpoints.

- `rg` (TRIM-KV): `linear1(hidden -> I, bias) -> SiLU -> linear2(I -> H_kv, no bias) + bias`.
- `rg10` (DBTrimKV): `linear1(hidden -> I, bias) -> SiLU -> linear2(I -> I, bias) -> SiLU ->
  linear3(I -> H_kv, no bias) + bias`, where `linear3` and `bias` (the calibration projection) are
  the same parameters in every layer when `tie_layers=True`; shared, they make scores comparable
  across layers and heads, which is what lets one global top-k work.
Output: `logsigmoid(...)` in float32, shape `[B, T, H_kv]`.

The gate modules themselves know nothing of hooks: `attach_retention_gates` builds them and asks
`dbtrimkv.modeling.attention` to install the hooks that feed them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import install_retention_attention
from ..errors import ConfigError
from .model_anatomy import text_attention_modules, text_config_of
from .model_state import GateSpec, existing_state, model_state

GATE_TYPES = ("rg", "rg10")


class RetentionGate(nn.Module):
    """TRIM-KV gate (`rg`)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_kv_heads: int, bias_init: float, std: float):
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, intermediate_size, bias=True)
        self.linear2 = nn.Linear(intermediate_size, num_kv_heads, bias=False)
        self.bias = nn.Parameter(torch.full((num_kv_heads,), float(bias_init)))
        nn.init.normal_(self.linear1.weight, std=std)
        nn.init.zeros_(self.linear1.bias)
        nn.init.normal_(self.linear2.weight, std=std)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The gate's pre-sigmoid output `[B, T, H_kv]` (training reads it: `log beta` saturates)."""
        hidden_states = hidden_states.to(self.linear1.weight.dtype)  # gates may be kept in float32
        return (self.linear2(F.silu(self.linear1(hidden_states))) + self.bias).float()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.logsigmoid(self.logits(hidden_states))


class RetentionGate10(nn.Module):
    """DBTrimKV gate (`rg10`); `linear3` and `bias` may be shared with other layers."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_kv_heads: int, bias_init: float, std: float,
                 shared: "RetentionGate10 | None" = None):
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, intermediate_size, bias=True)
        self.linear2 = nn.Linear(intermediate_size, intermediate_size, bias=True)
        for layer in (self.linear1, self.linear2):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)
        if shared is None:
            self.linear3 = nn.Linear(intermediate_size, num_kv_heads, bias=False)
            nn.init.normal_(self.linear3.weight, std=std)
            self.bias = nn.Parameter(torch.full((num_kv_heads,), float(bias_init)))
        else:  # the calibration projection: the very same parameters as `shared`'s
            self.linear3 = shared.linear3
            self.bias = shared.bias

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The gate's pre-sigmoid output `[B, T, H_kv]` (training reads it: `log beta` saturates)."""
        hidden_states = hidden_states.to(self.linear1.weight.dtype)  # gates may be kept in float32
        h = F.silu(self.linear2(F.silu(self.linear1(hidden_states))))
        return (self.linear3(h) + self.bias).float()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.logsigmoid(self.logits(hidden_states))


def gate_spec_of(model) -> GateSpec | None:
    state = existing_state(model)
    return state.gate_spec if state is not None else None


def attach_retention_gates(model, gate_type: str = "rg10", intermediate_size: int = 512, bias_init: float = 18.0,
                           tie_layers: bool = True):
    """Add a retention gate to every text attention layer and switch to retention-aware attention.

    Idempotent: calling again with the same settings does nothing; different settings are an
    error (the existing gates may hold trained weights). Returns the model.
    """
    if gate_type not in GATE_TYPES:
        raise ConfigError(f"unknown gate_type {gate_type!r}; choose one of {', '.join(GATE_TYPES)}")
    # `rg` has nothing shared across layers, so its spec records tie_layers=False.
    spec = GateSpec(gate_type, int(intermediate_size), float(bias_init), bool(tie_layers) and gate_type == "rg10")
    existing = gate_spec_of(model)
    if existing is not None:
        if existing != spec:
            raise ConfigError(f"retention gates {existing} are already attached; cannot re-attach as {spec}")
        return model
    text = text_config_of(model)
    num_kv_heads = text.num_key_value_heads
    std = getattr(text, "initializer_range", 0.02)
    attention_modules = text_attention_modules(model)
    param = next(model.parameters())
    shared = None
    for module in attention_modules:
        if gate_type == "rg":
            gate = RetentionGate(text.hidden_size, spec.intermediate_size, num_kv_heads, bias_init, std)
        else:
            gate = RetentionGate10(text.hidden_size, spec.intermediate_size, num_kv_heads, bias_init, std, shared)
            if spec.tie_layers and shared is None:
                shared = gate
        module.retention_gate = gate.to(device=param.device, dtype=param.dtype)
    model_state(model).gate_spec = spec
    install_retention_attention(model)
    return model


def gate_parameters(model) -> dict[str, nn.Parameter]:
    """Gate parameters by full state-dict name (shared parameters appear under every layer)."""
    return {name: p for name, p in model.state_dict(keep_vars=True).items() if ".retention_gate." in name}


def gate_outputs(model, hidden_states: torch.Tensor) -> torch.Tensor:
    """`log beta` of every layer for the same hidden states: `[L, B, T, H_kv]` (for tests/tools)."""
    return torch.stack([m.retention_gate(hidden_states) for m in text_attention_modules(model)])
