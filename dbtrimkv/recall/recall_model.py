"""The tiny Qwen3-VL of the synthetic recall benchmark: its architecture, and where it is saved.

Why: the benchmark needs a model that actually solves the task with a full cache. It is the
released Qwen3-VL architecture at toy sizes, built with the same machinery as `dbtrimkv.loading.tiny`
(same tokenizer, processor and special tokens; only the text/vision sizes come from
`configs/recall-tiny.yaml`), trained from scratch by `dbtrimkv eval train-recall` into
`runs/recall-tiny/` (safetensors + processor files), where `dbtrimkv eval train-gates` adds its
gates. The shipped default `tiny-recall` (dbtrimkv/assets/tiny-recall) is a copy of that directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, GenerationConfig

from ..errors import ConfigError
from ..inputs.prompts import VideoOptions
from ..loading import tiny
from ..modeling.transformers_compat import VIDEO_LAYOUTS
from ..settings import presets

RECIPE = "recall-tiny.yaml"


def load_recipe(name_or_path: str | Path = RECIPE) -> dict[str, Any]:
    """The training recipe (model sizes, task mixture, optimiser) from a preset name or YAML path."""
    return presets.load_yaml(name_or_path)


def recipe_video(recipe: dict[str, Any]) -> VideoOptions:
    """How the recipe's videos are laid out in its chats (`video_layout`: "installed" when absent; the
    tiny-recall recipes pin "wrapped", the layout they were first run with, so that they give the same
    batches, and so the same weights, on every supported transformers release)."""
    layout = recipe.get("video_layout", "installed")
    if layout not in VIDEO_LAYOUTS:
        raise ConfigError(f"video_layout must be one of {', '.join(VIDEO_LAYOUTS)}, got {layout!r}")
    return VideoOptions(layout=layout)


def build_config(model_spec: dict[str, Any]):
    """The tiny Qwen3-VL config with the text and vision sizes of `model_spec` (patching and
    merging stay the tiny processor's, so `tiny.build_processor()` matches the model)."""
    config = tiny.build_config("qwen3_vl")
    text = dict(model_spec["text"])
    mrope = text.pop("mrope_section")
    rope = dict(config.text_config.rope_parameters, mrope_section=list(mrope))
    if "rope_theta" in text:
        rope["rope_theta"] = float(text.pop("rope_theta"))
    if sum(mrope) * 2 != text["head_dim"]:
        raise ValueError(f"mrope_section {mrope} must sum to head_dim / 2 = {text['head_dim'] // 2}")
    config.text_config.update(text)
    config.text_config.rope_parameters = rope
    config.vision_config.update(dict(model_spec["vision"], out_hidden_size=text["hidden_size"]))
    return config


def build_model(model_spec: dict[str, Any], seed: int):
    """`(model, processor)`: a freshly initialised recall model (deterministic by `seed`)."""
    config = build_config(model_spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    _scale_qk_norms(model, float(model_spec.get("qk_norm_init", 1.0)))
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                                               do_sample=False)
    return model, tiny.build_processor()


@torch.no_grad()
def _scale_qk_norms(model, gain: float) -> None:
    """Start the text attention's q/k RMSNorm weights at `gain` instead of 1.

    Why: with q and k normalised, an attention logit is at most gain^2 * sqrt(head_dim); at gain 1
    and head_dim 32 that is ~5.7, too flat to single out one card among a few hundred tokens, and
    the weights only grow by ~lr per step. A larger start lets the lookup head sharpen early."""
    for layer in model.model.language_model.layers:
        layer.self_attn.q_norm.weight.fill_(gain)
        layer.self_attn.k_norm.weight.fill_(gain)


def save_model(model, processor, directory: str | Path) -> Path:
    """Write weights (safetensors), config and processor files to `directory`."""
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
