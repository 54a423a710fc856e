"""Assemble a server from a loaded model: pool, engine, limits, app; and the start-up report.

Why: the CLI (`dbtrimkv serve`), the tests and the benchmark build the same server; the sizes an
operator must know (pool slots and bytes, the per-request bound, how many requests fit at once)
are computed here once and printed at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI

from ..cache.portable import ModelIdentity
from ..settings.config import DBTrimKVConfig
from ..errors import ConfigError
from ..modeling.gates import text_config_of
from ..reporting.stats_text import format_bytes
from .admission import Reservation, memory_bytes, view_columns
from .app import HTTPOptions, build_app
from .engine import Engine
from .media_sources import MediaPolicy
from .schema import ServerLimits
from .session_store import SessionFiles


@dataclass
class ServerOptions:
    model_name: str = "tiny-recall"
    kv_memory: tuple[str, float] = ("bytes", 1024**3)  # from admission.parse_kv_memory
    max_running: int = 16
    max_queue: int = 64
    max_sessions: int = 64
    max_tokens: int = 4096
    default_max_tokens: int = 256
    max_prefill_tokens: int | None = None  # per engine step; None: max(2048, the prefill chunk)
    stream_interval: int = 1  # a streamed answer's text goes out every N tokens (vLLM's --stream-interval)
    http: HTTPOptions = field(default_factory=HTTPOptions)
    allow_media_dir: Path | None = None
    allow_remote_media: bool = False
    video_fps: float = 2.0
    video_max_frames: int = 64
    session_store: Path | None = None  # --session-store: sessions spill there and resume without re-prefill
    session_write_through: bool = False  # also save every finished turn (replicas: a dead one loses no session)


def create_server(model, processor, config: DBTrimKVConfig, options: ServerOptions) -> tuple[FastAPI, Engine]:
    """The app and its (not yet started) engine; the app's lifespan starts and stops the engine."""
    engine = create_engine(model, processor, config, options)
    return build_app(engine, server_limits(processor, config, options), options.http), engine


def create_engine(model, processor, config: DBTrimKVConfig, options: ServerOptions) -> Engine:
    """The engine the options describe (not yet started), or ConfigError if not even a one-token request fits."""
    text = text_config_of(model)
    layers, heads = text.num_hidden_layers, text.num_key_value_heads
    param = next(model.parameters())
    engine = Engine(model, processor, config, memory_bytes(options.kv_memory, param.device), options.max_running,
                    options.max_queue, options.max_sessions, options.max_prefill_tokens,
                    stream_interval=options.stream_interval)
    smallest = engine.bound_for(engine.budget, config, 1)
    one_token = Reservation(smallest, (), view_columns(smallest, layers * heads, 2, config.buffer_size))
    refusal = engine.admission.never_fits(one_token)
    if refusal is not None:
        raise ConfigError(refusal)
    if options.session_store is not None:
        engine.sessions.files = engine.session_files = SessionFiles(options.session_store, ModelIdentity.of(model),
                                                                    options.session_write_through)
    return engine


def server_limits(processor, config: DBTrimKVConfig, options: ServerOptions) -> ServerLimits:
    """What the HTTP layer checks a request against (it needs the processor, not the model)."""
    media = MediaPolicy(allow_dir=options.allow_media_dir, allow_remote=options.allow_remote_media,
                        max_bytes=options.http.max_request_bytes, video_fps=options.video_fps,
                        video_max_frames=options.video_max_frames,
                        max_pixels_per_request=options.http.max_prompt_tokens * _pixels_per_token(processor))
    return ServerLimits(options.model_name, config, options.max_tokens,
                        min(options.default_max_tokens, options.max_tokens), media)


def _pixels_per_token(processor) -> int:
    """Most decoded pixels one prompt token stands for: a visual token covers (patch x merge)^2 pixels of
    an image, or of each of `temporal_patch_size` video frames (Qwen3-VL: 32 x 32 x 2)."""
    image = getattr(processor, "image_processor", None)
    side = getattr(image, "patch_size", 16) * getattr(image, "merge_size", 2)
    return side * side * getattr(image, "temporal_patch_size", 2)


def startup_report(engine: Engine) -> str:
    admission, config = engine.admission, engine.config
    pool = admission.pool_slots
    full = engine.bound_for(engine.budget, config, config.prefill_chunk)
    budget = engine.budget
    per_request_views = engine.metrics.get("kv_request_views_bytes")
    fit = pool // full if not per_request_views else min(pool // full, int(admission.view_bytes // per_request_views))
    if engine.row_view_bytes is None:
        views = "No attention views (the kernels read the pool in place): all of it is pool."
    else:
        views = (f"Attention views (CPU: contiguous copies of the running requests' kept K/V): up to "
                 f"{format_bytes(admission.view_bytes)}, {format_bytes(per_request_views)} reserved per such request.")
    return (
        f"KV memory: {format_bytes(engine.kv_memory)} for the pool and the attention views together, never more.\n"
        f"KV pool: {pool} entries ({format_bytes(engine.pool_bytes)}, {engine.slot_bytes} bytes each), allocated once. "
        f"{views}\n"
        f"Per-request bound: budget {budget} + {engine.num_layers} layers x {engine.num_kv_heads} KV heads x "
        f"max(buffer {config.buffer_size}, prefill chunk {config.prefill_chunk}) = {full} entries for a prompt of "
        f"{config.prefill_chunk}+ tokens (less for shorter prompts): room for {fit} such requests at once, "
        f"{min(fit, engine.max_running)} of them run together (--max-running {engine.max_running}), up to "
        f"{engine.max_queue} more wait (--max-queue). A step prefills at most "
        f"{engine.max_prefill_tokens} prompt tokens (--max-prefill-tokens-per-step)."
    )
