"""Where things are inside a transformers model: the one place that knows the attribute paths.

Why: dbtrimkv works from outside the model files, so it must find the text config, the text
decoder, its layers and their attention modules in Qwen3-VL, Qwen3-VL-MoE and plain causal LMs,
and switch the text attention implementation while the vision tower keeps `sdpa`. Every module that
needs one of these asks here, so supporting a new model family starts (and usually ends) in this
file. Leaf module: it imports nothing from dbtrimkv but the errors.
"""

from __future__ import annotations

from torch import nn

from ..errors import ModelLoadError

RETENTION_ATTENTION = "dbtrimkv"  # the attention implementation dbtrimkv registers (dbtrimkv.modeling.attention)


def text_config_of(model):
    """The language model's config (the text part of a vision-language config)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def text_decoder(model) -> nn.Module:
    """The text decoder whose `layers` hold the attention (Qwen3-VL, Qwen3-VL-MoE, or a causal LM)."""
    inner = getattr(model, "model", model)
    for candidate in (getattr(inner, "language_model", None), inner):
        layers = getattr(candidate, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "self_attn"):
            return candidate
    raise ModelLoadError(
        f"unsupported model {type(model).__name__}: no text decoder layers with `self_attn` were found"
    )


def text_decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of the language model."""
    return text_decoder(model).layers


def text_attention_modules(model) -> list[nn.Module]:
    """The self-attention module of every text decoder layer, in layer order."""
    return [layer.self_attn for layer in text_decoder_layers(model)]


def set_text_attention(model, name: str) -> None:
    """Switch the text decoder's attention implementation to `name`; a vision tower keeps sdpa."""
    if hasattr(model.config, "vision_config"):
        model.set_attn_implementation({"text_config": name, "vision_config": "sdpa"})
    else:
        model.set_attn_implementation(name)


def text_attention_name(model) -> str | None:
    """The text decoder's current attention implementation."""
    return getattr(text_config_of(model), "_attn_implementation", None)
