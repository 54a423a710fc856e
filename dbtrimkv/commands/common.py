"""Options shared by several subcommands, and turning them into objects."""

from __future__ import annotations

import argparse
import sys

import yaml

from ..config import MAX_BUDGET, MAX_BUFFER_SIZE, MAX_MEMORY_SIZE, MAX_PREFILL_CHUNK
from ..errors import ConfigError
from ..eviction_settings import resolve_eviction
from ..loading import resolve_device
from ..policies import policy_names, policy_option_defaults
from . import arguments

TINY_NOTICE = (
    "Notice: the default model is tiny-recall, a toy Qwen3-VL trained only on the synthetic recall task: it "
    "answers 'which digit is in the image?' about digit images like demos/examples/*.png and nothing else. "
    "Pass --model to use a real Qwen3-VL."
)


def add_model_args(p: argparse.ArgumentParser, default: str = "the shipped tiny-recall model") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="a local directory, a hub id (e.g. ngocbh/DBTrimKV-Qwen3-VL-4B-Instruct), a directory "
                        "written by save_gates / dbtrimkv train, tiny-recall (shipped, trained on the synthetic recall "
                        f"task) or tiny / tiny-moe / tiny-text (random weights) (default: {default})")
    g.add_argument("--device", default="auto", type=arguments.device, help="cpu, cuda, cuda:N or auto (default: auto)")
    g.add_argument("--dtype", default="auto",
                   help="float32, bfloat16, float16 or auto (default: bf16 on GPU, fp32 on CPU)")


def add_media_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("media")
    g.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file (repeatable)")
    g.add_argument("--video", action="append", default=[], metavar="PATH", help="a video file (repeatable)")
    g.add_argument("--video-fps", type=arguments.video_fps, default=2.0,
                   help="frames sampled per second of video; 0 = every frame (default: 2)")
    g.add_argument("--video-max-frames", type=arguments.frames, default=64,
                   help="at most this many frames per video (default: 64)")


def add_eviction_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KV budget (defaults: the checkpoint's settings, else configs/default.yaml)")
    g.add_argument("--config", default=None, metavar="YAML",
                   help="eviction settings from a YAML/JSON file or a preset name in configs/ (e.g. budget-tight)")
    g.add_argument("--budget", type=arguments.int_in(1, MAX_BUDGET), default=None,
                   help="cache entries kept per sequence, summed over all layers and KV heads")
    g.add_argument("--memory-size", type=arguments.int_in(1, MAX_MEMORY_SIZE), default=None,
                   help="entries kept per (layer, KV head) on average: budget = layers x KV heads x this")
    g.add_argument("--policy", default=None, choices=policy_names(), help="which entries compete for the budget "
                   "(global = DBTrimKV, head = TrimKV per head; default: global)")
    g.add_argument("--threshold", type=arguments.fraction, default=None,
                   help="policy threshold: keep entries whose decayed retention beta^age is at least this (0, 1]")
    g.add_argument("--policy-option", action="append", default=[], metavar="NAME=VALUE",
                   help="an option of the chosen policy (repeatable; " + _policy_options_help() + ")")
    g.add_argument("--buffer-size", type=arguments.int_in(0, MAX_BUFFER_SIZE), default=None,
                   help="tokens decoded between evictions (default from the config: 32)")
    g.add_argument("--prefill-chunk", type=arguments.int_in(1, MAX_PREFILL_CHUNK), default=None,
                   help="prompt tokens per prefill step; peak memory is budget + layers x heads x chunk")
    g.add_argument("--full-cache", action="store_true", help="no budget: keep every entry (baseline; the threshold policy still drops entries below tau)")


def _policy_options_help() -> str:
    described = [f"{name}: " + ", ".join(f"{k}={v}" for k, v in policy_option_defaults(name).items())
                 for name in policy_names() if policy_option_defaults(name) and name != "threshold"]
    return "defaults: " + "; ".join(described)


def parse_policy_options(items: list[str]) -> dict:
    """`["window=32", "kernel=7"]` -> `{"window": 32, "kernel": 7}` (values read as YAML scalars)."""
    options = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--policy-option expects NAME=VALUE, got {item!r}")
        try:
            options[name.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--policy-option {item!r}: cannot read the value {value!r}") from None
    return options


def eviction_config(args, model):
    """The DBTrimKVConfig the options describe, resolved by `dbtrimkv.eviction_settings`."""
    return resolve_eviction(model, **eviction_request(args))


def eviction_request(args) -> dict:
    """The eviction flags as `resolve_eviction` keyword arguments (plain values: they may travel to
    another process, e.g. a Ray Serve replica, that resolves them against its own model)."""
    explicit = {k: getattr(args, k, None) for k in ("budget", "memory_size", "policy", "threshold", "buffer_size",
                                                   "prefill_chunk")}
    return dict(explicit, config=args.config, full_cache=args.full_cache,
                policy_options=parse_policy_options(getattr(args, "policy_option", [])) or None)


def check_before_load(args) -> None:
    """Cross-flag checks that need no model: the eviction settings, the device, the server port."""
    if getattr(args, "device", None) not in (None, "auto"):
        resolve_device(args.device)  # ModelLoadError: CUDA asked for but not available
    if hasattr(args, "budget") and hasattr(args, "full_cache"):
        eviction_config(args, None)  # ConfigError for settings that cannot work together
    if getattr(args, "sample", None) is False and (args.temperature is not None or args.top_p is not None):
        print("dbtrimkv: note: --temperature / --top-p only apply with --sample (greedy decoding otherwise)",
              file=sys.stderr)
