"""Random models at the real shapes of the released base models (`configs/shapes/*.yaml`).

Why: weights cannot be downloaded here, but dimensions, dtypes and processors can be real. Each
shape file holds the public config values of one base model (Qwen3-VL 2B / 4B / 8B / 30B-A3B,
Qwen3 1.7B / 4B / 4B-Instruct-2507 / 8B / 14B, Phi-3-mini-128k), with its sources. `build_model`
makes a random model of that shape at full width and a chosen depth, so tests and benchmarks run
the real per-layer dimensions (hidden size, heads, KV heads, head_dim, M-RoPE sections, rotary
scaling, deepstack, vision tower width) and the real processor settings (min/max pixels, video
frame limits).

What is not real: the weights (random), the tokenizer (the tiny byte-level one with the Qwen
special tokens, so the vision token ids are its ids, not 151655...), and, unless asked for, the
vocabulary size (`vocab_size=` shrinks the embedding and LM head; only their cost changes).
Truncating the vision tower (`vision_depth`) maps the deepstack indexes proportionally so the
same number of deepstack features still reaches the text decoder.
"""

from __future__ import annotations

from contextlib import nullcontext
from importlib import resources
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig
from transformers import Phi3Config, Qwen3Config, Qwen3VLConfig, Qwen3VLMoeConfig

try:
    from transformers.initialization import no_init_weights
except ImportError:  # transformers releases without it
    no_init_weights = None

from ..settings import presets
from . import tiny
from ..errors import ConfigError

FAMILIES = ("qwen3_vl", "qwen3_vl_moe", "qwen3", "phi3")


def shape_names() -> list[str]:
    """Names of the shipped shape files (`configs/shapes/NAME.yaml`)."""
    folder = resources.files("dbtrimkv.configs").joinpath("shapes")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_shape(name: str) -> dict[str, Any]:
    """The parsed shape file `configs/shapes/NAME.yaml`."""
    if name not in shape_names():
        raise ConfigError(f"unknown model shape {name!r}; shipped shapes: {', '.join(shape_names())}")
    shape = presets.load_yaml(str(resources.files("dbtrimkv.configs").joinpath("shapes", f"{name}.yaml")))
    if shape.get("family") not in FAMILIES:
        raise ConfigError(f"shape {name!r}: family must be one of {', '.join(FAMILIES)}, got {shape.get('family')!r}")
    return shape


def _truncated_deepstack(indexes: list[int], full_depth: int, depth: int) -> list[int]:
    if depth >= full_depth:
        return list(indexes)
    return sorted({min(depth - 1, i * depth // full_depth) for i in indexes})


def _text_kwargs(shape: dict, num_layers: int | None, vocab_size: int | None, tokenizer) -> dict[str, Any]:
    text = dict(shape["text"])
    if num_layers is not None:
        if not 1 <= num_layers <= text["num_hidden_layers"]:
            raise ConfigError(f"num_layers must be in [1, {text['num_hidden_layers']}], got {num_layers}")
        text["num_hidden_layers"] = num_layers
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    if text["vocab_size"] < tiny.vocab_size():
        raise ConfigError(f"vocab_size must be at least {tiny.vocab_size()} (the tokenizer's ids)")
    family = shape["family"]
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta"),
                                   "mrope_section": text.pop("mrope_section"), "mrope_interleaved": True}
    elif family == "qwen3":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
    text.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                bos_token_id=None)
    return text


def build_config(name: str, num_layers: int | None = None, vision_depth: int | None = None,
                 vocab_size: int | None = None):
    """The transformers config of shape `name`, optionally with fewer text layers / vision blocks."""
    shape = load_shape(name)
    tokenizer = tiny.build_tokenizer()
    text = _text_kwargs(shape, num_layers, vocab_size, tokenizer)
    tie = text["tie_word_embeddings"]
    family = shape["family"]
    if family == "qwen3":
        return Qwen3Config(**text)
    if family == "phi3":
        return Phi3Config(**text)
    vision = dict(shape["vision"])
    if vision_depth is not None:
        if not 1 <= vision_depth <= vision["depth"]:
            raise ConfigError(f"vision_depth must be in [1, {vision['depth']}], got {vision_depth}")
        vision["deepstack_visual_indexes"] = _truncated_deepstack(vision["deepstack_visual_indexes"],
                                                                  vision["depth"], vision_depth)
        vision["depth"] = vision_depth
    cls = Qwen3VLConfig if family == "qwen3_vl" else Qwen3VLMoeConfig
    config = cls(text_config=text, vision_config=vision, tie_word_embeddings=tie, **tiny.vision_token_ids(tokenizer))
    config.eos_token_id = text["eos_token_id"]
    config.pad_token_id = text["pad_token_id"]
    return config


def build_processor(name: str):
    """The processor for shape `name`: the real Qwen3-VL image/video settings around the tiny
    tokenizer (Qwen3-VL shapes), or the tokenizer alone (text-only shapes)."""
    shape = load_shape(name)
    tokenizer = tiny.build_tokenizer()
    if shape["family"] in ("qwen3", "phi3"):
        return tokenizer
    return tiny.build_processor(tokenizer, vision=shape["vision"], settings=shape["processor"])


def build_model(name: str, num_layers: int | None = 2, vision_depth: int | None = 2, vocab_size: int | None = None,
                dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """`(model, processor)`: random weights at the real width of shape `name`, `num_layers` text
    layers (None: all) and `vision_depth` vision blocks (None: all), in `dtype`, deterministic by seed."""
    config = build_config(name, num_layers, vision_depth, vocab_size)
    cls = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    with _skipped_init():
        model = cls.from_config(config, dtype=dtype)
    fill_random(model, seed, getattr(config.get_text_config(), "initializer_range", 0.02))
    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                                               do_sample=False)
    return model, build_processor(name)


_BLOCK = 1_000_003  # a prime: the tiled block never lines up with a row, so rows differ


def _skipped_init():
    """transformers' own random init costs ~50 ns per parameter on a busy CPU (minutes for billions);
    skip it where transformers can, `fill_random` replaces it."""
    if no_init_weights is None:  # older releases: keep their init (slower, same result shape-wise)
        return nullcontext()
    return no_init_weights()


@torch.no_grad()
def fill_random(model, seed: int, std: float) -> None:
    """Deterministic pseudo-random weights at ~1 ns per parameter: matrices get N(0, std) values read
    from one random block at a per-tensor, per-slice offset; norm weights 1, other vectors 0."""
    gen = torch.Generator().manual_seed(seed)
    blocks = {torch.device("cpu"): torch.randn(2 * _BLOCK, generator=gen, device="cpu") * std}
    for index, (name, param) in enumerate(model.named_parameters()):
        block = blocks.setdefault(param.device, blocks[torch.device("cpu")].to(param.device))
        flat = param.view(-1)
        if param.ndim == 1:
            flat.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            continue
        for start in range(0, flat.numel(), _BLOCK):
            size = min(_BLOCK, flat.numel() - start)
            offset = (index * 7919 + start // _BLOCK * 104729) % _BLOCK
            flat[start:start + size].copy_(block[offset:offset + size])
