"""Assemble a server from a loaded model: pool, engine, limits, app; and the start-up report.

Why: the CLI (`dbtrimkv serve`), the tests and the benchmark build the same server; the sizes an
operator must know (pool slots and bytes, the per-request bound, how many requests fit at once)
are computed here once and printed at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI

from ..config import DBTrimKVConfig
from ..errors import ConfigError
from ..gates import text_config_of
from ..pipeline import format_bytes
from .admission import pool_slots, slot_bytes
from .app import HTTPOptions, build_app
from .engine import Engine
from .media_sources import MediaPolicy
from .schema import ServerLimits


@dataclass
class ServerOptions:
    model_name: str = "tiny-recall"
    kv_memory: tuple[str, float] = ("bytes", 1024**3)  # from admission.parse_kv_memory
    max_running: int = 16
    max_queue: int = 64
    max_sessions: int = 64
    max_tokens: int = 4096
    default_max_tokens: int = 256
    http: HTTPOptions = field(default_factory=HTTPOptions)
    allow_media_dir: Path | None = None
    allow_remote_media: bool = False
    video_fps: float = 2.0
    video_max_frames: int = 64


def create_server(model, processor, config: DBTrimKVConfig, options: ServerOptions) -> tuple[FastAPI, Engine]:
    """The app and its (not yet started) engine; the app's lifespan starts and stops the engine."""
    text = text_config_of(model)
    layers, heads = text.num_hidden_layers, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    param = next(model.parameters())
    budget = config.resolve_budget(layers, heads)
    if budget is None:
        raise ConfigError("dbtrimkv serve needs a KV budget (--budget or --memory-size; --full-cache has no bound "
                          "to admit requests by)")
    slots = pool_slots(options.kv_memory, head_dim, param.dtype, param.device)
    engine = Engine(model, processor, config, slots, options.max_running, options.max_queue, options.max_sessions)
    smallest = engine.bound_for(config, 1)
    if slots < smallest:
        raise ConfigError(f"--kv-memory holds {slots} KV entries, but one request needs up to {smallest}; give the "
                          "pool more memory or lower the budget")
    media = MediaPolicy(allow_dir=options.allow_media_dir, allow_remote=options.allow_remote_media,
                        max_bytes=options.http.max_request_bytes, video_fps=options.video_fps,
                        video_max_frames=options.video_max_frames)
    limits = ServerLimits(options.model_name, config, budget, layers, heads, options.max_tokens,
                          min(options.default_max_tokens, options.max_tokens), media)
    return build_app(engine, limits, options.http), engine


def startup_report(engine: Engine) -> str:
    per_slot = slot_bytes(engine.head_dim, engine.dtype)
    pool = engine.admission.pool_slots
    config = engine.config
    full = engine.bound_for(config, config.prefill_chunk)
    budget = config.resolve_budget(engine.num_layers, engine.num_kv_heads)
    return (
        f"KV pool: {pool} entries ({format_bytes(pool * per_slot)}, {per_slot} bytes each), allocated once.\n"
        f"Per-request bound: budget {budget} + {engine.num_layers} layers x {engine.num_kv_heads} KV heads x "
        f"max(buffer {config.buffer_size}, prefill chunk {config.prefill_chunk}) = {full} entries for a prompt of "
        f"{config.prefill_chunk}+ tokens (less for shorter prompts): at least {pool // full} such requests run at "
        f"once (--max-running {engine.max_running}, --max-queue {engine.max_queue} waiting)."
    )
