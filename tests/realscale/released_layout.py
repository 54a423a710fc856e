"""Write a gate checkpoint directory in the layout of the released TrimKV / DBTrimKV checkpoints,
independently of dbtrimkv's own writer (`export_released_format`), so loading is tested against
the format rather than against ourselves.

Layout: `config.json` = the base model's config plus `base_model`, `retention_gate` (`rg` / `rg10`),
`retention_gate_intermediate_size`, `retention_gate_bias_init`, `tie_retention_gate_layers`,
`memory_size`, `buffer_size`, `trainable_params`; `trimkv_weights.pth` = `torch.save` of a plain
dict of gate tensors keyed by full model names (`model.language_model.layers.N.self_attn.retention_gate.linear1.weight`
for Qwen3-VL, `model.layers.N....` for text models). `rg`: linear1 (+bias), linear2 (no bias), bias;
`rg10`: linear1, linear2 (both with bias), linear3 (no bias), bias, with linear3 and bias equal in
every layer when tied. The base model is saved in `base/` (named relatively in `base_model`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dbtrimkv.loading import shapes

INTERMEDIATE = 512
BIAS_INIT = 18.0


def gate_state(prefix: str, num_layers: int, hidden: int, kv_heads: int, gate_type: str, tied: bool,
               seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    shared = {"linear3.weight": rand(kv_heads, INTERMEDIATE), "bias": torch.full((kv_heads,), BIAS_INIT) + rand(kv_heads)}
    state = {}
    for layer in range(num_layers):
        key = f"{prefix}.layers.{layer}.self_attn.retention_gate."
        state[key + "linear1.weight"] = rand(INTERMEDIATE, hidden)
        state[key + "linear1.bias"] = rand(INTERMEDIATE)
        if gate_type == "rg":
            state[key + "linear2.weight"] = rand(kv_heads, INTERMEDIATE)
            state[key + "bias"] = torch.full((kv_heads,), BIAS_INIT) + rand(kv_heads)
        else:
            state[key + "linear2.weight"] = rand(INTERMEDIATE, INTERMEDIATE)
            state[key + "linear2.bias"] = rand(INTERMEDIATE)
            own = shared if tied else {"linear3.weight": rand(kv_heads, INTERMEDIATE),
                                       "bias": torch.full((kv_heads,), BIAS_INIT) + rand(kv_heads)}
            state[key + "linear3.weight"] = own["linear3.weight"].clone()
            state[key + "bias"] = own["bias"].clone()
    return state


def write_released_checkpoint(directory: Path, shape: str, entry: dict, num_layers: int, vocab_size: int,
                              memory_size: int = 8, buffer_size: int = 4) -> tuple[Path, dict[str, torch.Tensor]]:
    """A released-layout checkpoint of `entry` (from the shape file's `released` list) on a random
    `num_layers`-layer base of `shape`; returns the directory and the gate tensors written."""
    model, processor = shapes.build_model(shape, num_layers=num_layers, vision_depth=1, vocab_size=vocab_size)
    base = directory / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    config = json.loads((base / "config.json").read_text())
    text = model.config.get_text_config()
    gate_type = entry["retention_gate"]
    tied = bool(entry.get("tie_retention_gate_layers", False))
    config.update(base_model="base", retention_gate=gate_type, retention_gate_intermediate_size=INTERMEDIATE,
                  retention_gate_bias_init=BIAS_INIT, tie_retention_gate_layers=tied, memory_size=memory_size,
                  buffer_size=buffer_size, trainable_params="self_attn.retention_gate")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    prefix = "model.language_model" if hasattr(model.config, "vision_config") else "model"
    state = gate_state(prefix, num_layers, text.hidden_size, text.num_key_value_heads, gate_type, tied)
    torch.save(state, directory / "trimkv_weights.pth")
    return directory, state
