"""Tiny offline Qwen3-VL / Qwen3-VL-MoE / Qwen3 models and a matching Qwen3-VL processor.

Why: model weights cannot be downloaded on our machines, yet every part of the engine must be
exercised on the real transformers architectures. This module builds, in about a second and with
no network, random models of the exact released architectures at toy sizes (sizes live in
`configs/tiny-qwen3-vl.yaml`) plus a processor with a deterministic byte-level tokenizer, the
Qwen3-VL special tokens, a Qwen3-VL-style chat template, and the real Qwen3-VL image and video
processors. `save_tiny()` writes both to a directory that `from_pretrained` /
`AutoProcessor.from_pretrained` reload offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedTokenizerFast
from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor
from transformers import Qwen3Config, Qwen3VLConfig, Qwen3VLMoeConfig
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

from ..settings import presets
from .._torchvision_compat import ensure_torchvision_importable

VARIANTS = ("qwen3_vl", "qwen3_vl_moe", "qwen3")

# Special tokens of the Qwen3 / Qwen3-VL tokenizer, in their released order.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
]

# Jinja chat template with the Qwen3-VL conventions: <|im_start|>role ... <|im_end|>, images as
# <|vision_start|><|image_pad|><|vision_end|>, videos as <|vision_start|><|video_pad|><|vision_end|>
# (the processor expands the pads to one token per merged patch and adds frame timestamps).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def tiny_spec() -> dict[str, Any]:
    """The tiny architecture and processor settings from `configs/tiny-qwen3-vl.yaml`."""
    return presets.load_yaml("tiny-qwen3-vl.yaml")


def _byte_level_vocab() -> dict[str, int]:
    return {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}


def build_tokenizer():
    """A deterministic byte-level BPE tokenizer (256 byte tokens, no merges) + Qwen specials."""
    vocab = _byte_level_vocab()
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
        model_max_length=1 << 20,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def vocab_size() -> int:
    """Vocabulary size of the tiny models: 256 bytes + specials, rounded up to a multiple of 64."""
    n = 256 + len(SPECIAL_TOKENS)
    return (n + 63) // 64 * 64


def build_processor(tokenizer=None, vision: dict | None = None, settings: dict | None = None):
    """A Qwen3VLProcessor (real image + video processors) around the tiny tokenizer.

    `vision` (patch sizes) and `settings` (min/max pixels, video frame limits) default to the tiny
    spec; `dbtrimkv.loading.shapes` passes the released models' values.
    """
    ensure_torchvision_importable()

    spec = tiny_spec()
    vis, proc = vision or spec["vision"], settings or spec["processor"]
    tokenizer = tokenizer or build_tokenizer()
    common = dict(patch_size=vis["patch_size"], temporal_patch_size=vis["temporal_patch_size"],
                  merge_size=vis["spatial_merge_size"])
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": proc["image_min_pixels"], "longest_edge": proc["image_max_pixels"]},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], **common,
    )
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": proc["video_min_pixels"], "longest_edge": proc["video_max_pixels"]},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], fps=proc["video_fps"],
        min_frames=proc["video_min_frames"], max_frames=proc["video_max_frames"], cap_pixels_per_frame=True,
        **common,
    )
    return Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def vision_token_ids(tokenizer) -> dict[str, int]:
    """The Qwen3-VL config's image / video / vision start / end token ids in `tokenizer`'s vocabulary."""
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    return dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def _text_kwargs(spec: dict, tokenizer) -> dict[str, Any]:
    text = dict(spec["text"])
    mrope = text.pop("mrope_section")
    theta = text.pop("rope_theta")
    return dict(
        text,
        vocab_size=vocab_size(),
        rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": mrope,
                         "mrope_interleaved": True},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        bos_token_id=None,
        tie_word_embeddings=False,
    )


def build_config(variant: str = "qwen3_vl"):
    """The transformers config of a tiny model (`qwen3_vl`, `qwen3_vl_moe` or `qwen3`)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; choose one of {', '.join(VARIANTS)}")

    spec = tiny_spec()
    tokenizer = build_tokenizer()
    text = _text_kwargs(spec, tokenizer)
    if variant == "qwen3":
        text = dict(text)
        rope = text.pop("rope_parameters")
        return Qwen3Config(**text, rope_parameters={"rope_type": "default", "rope_theta": rope["rope_theta"]})
    vision = dict(spec["vision"], out_hidden_size=spec["text"]["hidden_size"])
    token_ids = vision_token_ids(tokenizer)
    if variant == "qwen3_vl":
        config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids)
    else:
        moe = dict(spec["moe"])
        config = Qwen3VLMoeConfig(text_config=dict(text, **moe), vision_config=vision,
                                  tie_word_embeddings=False, **token_ids)
    config.eos_token_id = text["eos_token_id"]
    config.pad_token_id = text["pad_token_id"]
    return config


def build_tiny(variant: str = "qwen3_vl", seed: int | None = None, dtype: torch.dtype = torch.float32):
    """Build `(model, processor)` for a tiny random model, deterministically from `seed`.

    For `qwen3` (text only) the processor is the tokenizer.
    """
    config = build_config(variant)
    seed = tiny_spec()["seed"] if seed is None else seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if variant == "qwen3":
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.eval()
    tokenizer = build_tokenizer()
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, do_sample=False,
    )
    processor = tokenizer if variant == "qwen3" else build_processor(tokenizer)
    return model, processor


def save_tiny(directory: str | Path, variant: str = "qwen3_vl", seed: int | None = None) -> Path:
    """Build a tiny model and save model + processor to `directory` (safetensors, offline)."""
    directory = Path(directory)
    model, processor = build_tiny(variant, seed=seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
