"""Load a model for gate training and freeze everything but the gates.

Why: only the retention gates learn; the base model is both the frozen teacher and the student's
backbone. On GPU the base model runs in bfloat16 while the gates (and so the optimizer state)
stay float32: a bias near 18 moves in steps of 0.125 in bfloat16, far coarser than the updates.
Each gate casts its input to its own dtype (`dbtrimkv.modeling.gates`). `assert_only_gates_trainable` checks the freeze.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..loading.checkpoints import holds_gates, load_model
from ..modeling.gates import attach_retention_gates, gate_parameters, text_attention_modules
from ..loading.models import load_base_model
from ..modeling.model_state import model_state
from .train_attention import enable_training_attention


def base_model_name(name: str) -> str:
    """What checkpoints record as `base_model`: an absolute path for local directories."""
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def load_for_training(config, device):
    """`(model, processor, base_model)`: gates attached (fresh, seeded) or loaded from a gate checkpoint."""
    torch.manual_seed(config.seed)
    if holds_gates(config.model):
        model, processor = load_model(config.model, device=device, dtype=config.dtype)
        return model, processor, model_state(model).base_model
    model, processor = load_base_model(config.model, device=device, dtype=config.dtype)
    attach_retention_gates(model, gate_type=config.gate_type, intermediate_size=config.gate_intermediate_size,
                           bias_init=config.gate_bias_init, tie_layers=config.tie_gate_layers)
    return model, processor, base_model_name(config.model)


def unique_gate_parameters(model) -> list[torch.nn.Parameter]:
    """Each gate parameter once (a tied calibration projection appears under every layer)."""
    return list({id(p): p for p in gate_parameters(model).values()}.values())


def prepare_for_gate_training(model, attention: str = "auto", gradient_checkpointing: bool = False) -> str:
    """Freeze the base model, make the gates float32 and trainable, switch to training attention.

    Returns the attention backend in use (`plain` or `flex`).
    """
    model.requires_grad_(False)
    for module in text_attention_modules(model):
        module.retention_gate.float()
    for param in unique_gate_parameters(model):
        param.requires_grad_(True)
    backend = enable_training_attention(model, attention)
    if gradient_checkpointing:
        # Non-reentrant: the gates' log beta leave each layer through a module attribute and must keep their graph.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
            model.activation_checkpointing_enable(kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()  # transformers only checkpoints layers in training mode (dropout is 0 in Qwen3 / Qwen3-VL)
    else:
        model.eval()
    assert_only_gates_trainable(model)
    return backend


def training_gate_hooks(model, decay_scale: float = 1.0, saturation_grad: float = 0.0) -> list:
    """Forward hooks on every gate for training only (remove the returned handles to stop; [] when
    both settings are neutral). The saved gates are the plain parameters either way.

    `decay_scale`: each gate's `log beta` is multiplied by it in the student's biased attention and
    the capacity loss, i.e. the decay over `decay_scale` times the distance: training sees every
    sequence that many times longer. A gate trained on 3k-token clips is served on 33k-token videos,
    where a log beta of -0.002 (kept for a clip's length) is long forgotten.

    `saturation_grad`: a floor on d log beta / d logit. `log beta = logsigmoid(z)` has gradient
    `sigmoid(-z)`, zero in float32 once z passes ~90: such entries (layer 1's timestamp `0` tokens
    in the shipped tiny-recall) are kept forever and no loss can lower them. The hook adds
    `saturation_grad * (z - z.detach())`, zero in value, so the losses reach those logits too."""
    if decay_scale == 1.0 and saturation_grad == 0.0:
        return []

    def hook(gate, args, log_beta):
        if saturation_grad:
            z = gate.logits(args[0])
            log_beta = log_beta + saturation_grad * (z - z.detach())
        return log_beta * decay_scale

    return [module.retention_gate.register_forward_hook(hook) for module in text_attention_modules(model)]


def assert_only_gates_trainable(model) -> None:
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    gates = {name for name, p in model.named_parameters() if ".retention_gate." in name}
    if not gates or trainable != gates:
        raise RuntimeError(f"only the retention gates may require grad ({len(gates)} gate parameters); also "
                           f"trainable: {sorted(trainable - gates)[:3]}, frozen gates: {sorted(gates - trainable)[:3]}")
