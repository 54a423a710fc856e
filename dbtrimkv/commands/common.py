"""Options shared by several subcommands, and turning them into objects."""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from ..errors import ConfigError
from ..settings.limits import MAX_BUDGET, MAX_BUFFER_SIZE, MAX_MEMORY_SIZE, MAX_PREFILL_CHUNK
from . import arguments
from .lazy import lazy

eviction_settings = lazy("dbtrimkv.settings.eviction_settings")
loading = lazy("dbtrimkv.loading.models")

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


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (there are none anyway when stderr is not a terminal)")


def show_progress(args) -> bool:
    """Whether progress bars may be drawn: not with --no-progress, nor when stderr is not a terminal
    (a log file or a pipe). When not, bars of the libraries (model downloads) are switched off too."""
    show = not getattr(args, "no_progress", False) and sys.stderr.isatty()
    if not show:  # read when tqdm / huggingface_hub are first imported, which the lazy commands have not done yet
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    return show


def add_eviction_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KV budget (defaults: the checkpoint's settings, else configs/default.yaml)")
    g.add_argument("--config", default=None, metavar="YAML",
                   help="eviction settings from a YAML/JSON file or a preset in configs/: budget-tight (a quarter of "
                        "the model's default budget), budget-long-video (four times it, smaller prefill chunks), "
                        "default, qwen3-vl-4b-instruct, qwen3-vl-8b-thinking")
    g.add_argument("--budget", type=arguments.int_in(1, MAX_BUDGET), default=None,
                   help="KV entries a sequence is cut back to when eviction runs; an entry is one token's K and V in "
                        "one layer and KV head (a token costs layers x KV heads entries). Eviction runs just before "
                        "a forward would pass budget + layers x KV heads x max(buffer size, prefill chunk) entries, "
                        "the most a sequence ever holds")
    g.add_argument("--memory-size", type=arguments.int_in(1, MAX_MEMORY_SIZE), default=None,
                   help="the budget per (layer, KV head), on average: budget = layers x KV heads x this")
    g.add_argument("--policy", default=None, choices=arguments.POLICY_NAMES, help="which entries compete for the budget "
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
    described = [f"{name}: " + ", ".join(f"{k}={v}" for k, v in options.items())
                 for name, options in arguments.POLICY_OPTION_DEFAULTS.items()]
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


# Library messages about settings, reworded for the command line: the flags, not the fields.
FLAG_WORDING = (
    ("set either budget (entries per sequence) or memory_size (entries per head), not both",
     "give either --budget (entries per sequence) or --memory-size (entries per layer and KV head), not both"),
    ("the threshold policy needs threshold tau in (0, 1]", "--policy threshold needs its tau: --threshold tau in (0, 1]"),
    ("threshold is only used by the threshold policy", "--threshold is only used by --policy threshold"),
    ("set the threshold policy's tau with the `threshold` setting, not in policy_options",
     "set the threshold policy's tau with --threshold TAU, not --policy-option"),
    ("its options: threshold (default None)", "it has none besides its tau, set with --threshold TAU"),
    (", got None", ", got none"),
)


def in_flag_words(message: str) -> str:
    for library, command_line in FLAG_WORDING:
        message = message.replace(library, command_line)
    return message


def eviction_config(args, model):
    """The DBTrimKVConfig the options describe, resolved by `dbtrimkv.settings.eviction_settings`. An error names
    the flags, or the --config file when the file alone cannot work."""
    try:
        return eviction_settings.resolve_eviction(model, **eviction_request(args))
    except ConfigError as exc:
        raise ConfigError(_config_file_error(args, model) or in_flag_words(str(exc))) from None


def eviction_request(args) -> dict:
    """The eviction flags as `resolve_eviction` keyword arguments (plain values: they may travel to
    another process, e.g. a Ray Serve replica, that resolves them against its own model)."""
    explicit = {k: getattr(args, k, None) for k in ("budget", "memory_size", "policy", "threshold", "buffer_size",
                                                   "prefill_chunk")}
    limits = [f"--{k.replace('_', '-')}" for k in ("budget", "memory_size") if explicit[k] is not None]
    if args.full_cache and limits:
        raise ConfigError(f"--full-cache keeps every entry, so it cannot be combined with {' and '.join(limits)}; "
                          "give one or the other")
    options = parse_policy_options(getattr(args, "policy_option", []))
    if "threshold" in options or "tau" in options:
        raise ConfigError(f"the threshold policy's tau is set with --threshold TAU, not --policy-option "
                          f"{'threshold' if 'threshold' in options else 'tau'}=...")
    return dict(explicit, config=args.config, full_cache=args.full_cache, policy_options=options or None)


def _config_file_error(args, model) -> str | None:
    """The error of the --config file on its own (over the model's default), naming the file; None if it works."""
    if args.config is None:
        return None
    try:
        eviction_settings.resolve_eviction(model, args.config)
    except ConfigError as exc:
        message = in_flag_words(str(exc))
        return message if str(args.config) in message else f"--config {args.config}: {message}"
    return None


def _eviction_flags_given(args) -> bool:
    """Whether any eviction option was given (without one the library default applies, which is valid:
    checking it would only import the engine, seconds before the command's own argument checks)."""
    return args.config is not None or args.full_cache or bool(getattr(args, "policy_option", [])) or any(
        getattr(args, k, None) is not None for k in ("budget", "memory_size", "policy", "threshold", "buffer_size",
                                                    "prefill_chunk"))


def check_before_load(args) -> None:
    """Cross-flag checks that need no model: the eviction settings, the device, the server port."""
    if getattr(args, "device", None) not in (None, "auto"):
        loading.resolve_device(args.device)  # ModelLoadError: CUDA asked for but not available
    if hasattr(args, "budget") and hasattr(args, "full_cache") and _eviction_flags_given(args):
        eviction_config(args, None)  # ConfigError for settings that cannot work together
    if getattr(args, "sample", None) is False and (args.temperature is not None or args.top_p is not None):
        print("dbtrimkv: note: --temperature / --top-p only apply with --sample (greedy decoding otherwise)",
              file=sys.stderr)
