"""`dbtrimkv serve`: the OpenAI-compatible server (dbtrimkv/serving/), with its limits checked first.

Why: every flag is validated before the model loads (a typo must not cost a model load), and so is
the listening address: the socket is bound first (a port in use or a host that does not resolve is
one `dbtrimkv: error:` line and exit 2, not a uvicorn error after the model and pool are loaded)
and handed to uvicorn. The pool size and per-request bound are printed at start-up so an operator
knows what fits.
"""

from __future__ import annotations

import socket
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from ..errors import ConfigError
from .arguments import positive_float as _positive_float, positive_int as _positive_int
from .common import (TINY_NOTICE, add_eviction_args, add_model_args, add_progress_arg, eviction_config,
                     eviction_request, in_flag_words, show_progress)
from .lazy import lazy

checkpoints = lazy("dbtrimkv.loading.checkpoints")
config = lazy("dbtrimkv.settings.config")
serving = lazy("dbtrimkv.serving")
admission = lazy("dbtrimkv.serving.admission")
app = lazy("dbtrimkv.serving.app")
refusals = lazy("dbtrimkv.serving.refusals")
engine_process = lazy("dbtrimkv.serving.engine_process")
replica_spec = lazy("dbtrimkv.serving.replica_spec")
server = lazy("dbtrimkv.serving.server")
session_store = lazy("dbtrimkv.serving.session_store")
torch = lazy("torch")
uvicorn = lazy("uvicorn")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server with continuous batching in one bounded KV pool",
        description="Serve POST /v1/chat/completions (OpenAI schema, streaming, images and videos as data URIs), "
                    "GET /v1/models, /health and /metrics (Prometheus). Requests share one KV pool sized once at "
                    "start-up; a request is admitted only when its worst-case KV (budget + layers x KV heads x "
                    "max(buffer, prefill chunk)) and, on CPU, its attention views fit, so KV memory never grows past "
                    "--kv-memory. Listens on 127.0.0.1 unless --host says otherwise.")
    add_model_args(p)
    add_eviction_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 exposes it)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    g.add_argument("--kv-memory", default="1GiB",
                   help="KV memory (the pool and, on CPU, the attention views together): bytes (4GiB, 512MiB) or "
                        "a fraction of the device's free memory (0.5) (default: 1GiB)")
    g.add_argument("--max-running", type=_positive_int, default=16, help="requests in the running batch (default: 16)")
    g.add_argument("--max-queue", type=_positive_int, default=64,
                   help="requests that may wait for admission; more get 429 with Retry-After (default: 64)")
    g.add_argument("--max-prefill-tokens-per-step", type=_positive_int, default=None, metavar="N",
                   help="prompt tokens one engine step may prefill; prefills beyond it wait a step while the running "
                        "requests keep decoding (default: max(2048, --prefill-chunk); at least --prefill-chunk)")
    g.add_argument("--stream-interval", type=_positive_int, default=1, metavar="N",
                   help="a streamed answer's text goes out every N tokens, the first token's at once (vLLM's "
                        "option): fewer, larger chunks cost the server less per token with many clients "
                        "(default: 1, every token)")
    g.add_argument("--max-sessions", type=_positive_int, default=64,
                   help="conversations (session_id) whose cache stays in the pool between requests; the least "
                        "recently used are dropped beyond this or when the pool needs room (default: 64)")
    g.add_argument("--session-store", type=Path, default=None, metavar="DIR",
                   help="folder where sessions go when the pool needs their room or the server stops, and resume "
                        "from without prefilling their history again (created if missing; default: none, such "
                        "sessions are dropped)")
    g.add_argument("--engine-process", action="store_true",
                   help="run the engine (the model, the KV pool, the scheduler) in a process of its own, apart from "
                        "the HTTP layer and the processor, which then no longer share one Python interpreter lock "
                        "with the model's steps (as vLLM runs its engine core); the same API and limits")
    r = p.add_argument_group("replicas (Ray Serve; needs the extra: pip install 'dbtrimkv[ray]')")
    r.add_argument("--replicas", type=_positive_int, default=1, metavar="N",
                   help="serve the same API from N engine replicas as Ray Serve deployments, routed by free KV "
                        "admission capacity, sessions sticking to their replica (default: 1, no Ray)")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (e.g. auto, or head-node:6379) instead of starting a local one; "
                        "replicas are placed on its machines (implies Ray even with --replicas 1)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (default: none)")
    g.add_argument("--served-model-name", default=None, help="model id clients send (default: --model or tiny-recall)")
    g.add_argument("--max-tokens", type=_positive_int, default=4096, help="largest max_tokens a request may ask for")
    g.add_argument("--max-prompt-tokens", type=_positive_int, default=32768,
                   help="longer prompts are refused with 413 (default: 32768)")
    g.add_argument("--max-request-mb", type=_positive_int, default=64,
                   help="largest request body in MiB (media included); larger gets 413 (default: 64)")
    g.add_argument("--allow-media-dir", type=Path, default=None, metavar="DIR",
                   help="let requests name image / video files (paths or file:// URLs) under DIR (default: refused)")
    g.add_argument("--allow-remote-media", action="store_true",
                   help="let requests name http(s) image / video URLs, fetched by the server (default: refused)")
    add_progress_arg(p)
    g.add_argument("--video-fps", type=_positive_float, default=2.0, help="frames sampled per second of video (default: 2)")
    g.add_argument("--video-max-frames", type=_positive_int, default=64, help="at most this many frames per video")
    p.set_defaults(func=run)


def options_from_args(args):
    """`ServerOptions` from the flags, or ConfigError naming the bad one (before any model loads)."""
    if args.full_cache:
        raise ConfigError(refusals.no_budget())
    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError("--api-key must not be empty")
    if args.allow_media_dir is not None and not args.allow_media_dir.is_dir():
        raise ConfigError(f"--allow-media-dir {args.allow_media_dir} is not a directory")
    if args.engine_process and (args.replicas > 1 or args.ray_address is not None):
        raise ConfigError("--engine-process serves one engine; with --replicas or --ray-address every replica "
                          "runs its engine in a process of its own already")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    cap, chunk = args.max_prefill_tokens_per_step, args.prefill_chunk
    if cap is not None and chunk is not None and cap < chunk:
        raise ConfigError(refusals.chunk_over_step_budget(chunk, cap))
    if args.session_store is not None:
        session_store.check_folder(args.session_store)
    http = app.HTTPOptions(api_key=args.api_key, max_request_bytes=args.max_request_mb * 1024 * 1024,
                       max_prompt_tokens=args.max_prompt_tokens)
    return server.ServerOptions(
        model_name=args.served_model_name or args.model or "tiny-recall", kv_memory=admission.parse_kv_memory(args.kv_memory),
        max_running=args.max_running, max_queue=args.max_queue, max_sessions=args.max_sessions,
        max_tokens=args.max_tokens, max_prefill_tokens=args.max_prefill_tokens_per_step,
        stream_interval=args.stream_interval, http=http,
        allow_media_dir=args.allow_media_dir,
        allow_remote_media=args.allow_remote_media, video_fps=args.video_fps, video_max_frames=args.video_max_frames,
        session_store=args.session_store,
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), or ConfigError saying why it cannot be (before any model loads)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--host {host!r} does not resolve to an address ({getattr(exc, 'strerror', exc)})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart may reuse the port
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def run(args) -> int:
    options = options_from_args(args)
    show_progress(args)  # the model download's bars
    if args.config:
        config.DBTrimKVConfig.load(args.config)  # a bad preset fails before the model loads
    sock = bind_socket(args.host, args.port)
    if args.model is None:
        print(TINY_NOTICE, file=sys.stderr)
    if args.replicas > 1 or args.ray_address is not None:
        sock.close()  # the address is free (checked); Ray Serve's proxy listens on it
        return _run_replicas(args, options)
    engine = None
    try:
        if args.engine_process:
            web_app, engine = _launch_engine_process(args, options)
            print(engine.report, file=sys.stderr)
        else:
            model, processor = checkpoints.load_model(args.model, device=args.device, dtype=args.dtype)
            web_app, engine = serving.create_server(model, processor, eviction_config(args, model), options)
            print(serving.startup_report(engine), file=sys.stderr)
        if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
            print(f"Warning: listening on {args.host} without --api-key: anyone who can reach it can use it.",
                  file=sys.stderr)
        uvicorn.Server(uvicorn.Config(web_app, host=args.host, port=args.port, log_level="info")).run(sockets=[sock])
    finally:
        sock.close()
        if engine is not None:
            engine.stop()  # (the app's shutdown stopped it already, unless the server never started)
    return 0


def _launch_engine_process(args, options):
    """`--engine-process`: the app, and the engine process that loaded the model (serving/engine_process.py)."""
    spec = replica_spec.ReplicaSpec(args.model, args.device, args.dtype, eviction_request(args), options)
    try:
        return engine_process.launch_server(spec)
    except ConfigError as exc:
        raise ConfigError(in_flag_words(str(exc))) from None


def _run_replicas(args, options) -> int:
    """`--replicas N` / `--ray-address`: the same server as N Ray Serve replicas (serving/ray_app.py)."""
    try:
        from ..serving import ray_app
    except ImportError as exc:
        raise ConfigError(f"--replicas and --ray-address need Ray Serve ({exc}): pip install 'dbtrimkv[ray]'") from None
    if options.session_store is None:  # replicas resume each other's sessions from one shared folder
        options = replace(options, session_store=Path(tempfile.mkdtemp(prefix="dbtrimkv-sessions-")))
        print(f"Session store: {options.session_store} (on several machines, give a shared --session-store)",
              file=sys.stderr)
    options = replace(options, session_write_through=True)
    spec = replica_spec.ReplicaSpec(args.model, args.device, args.dtype, eviction_request(args), options)
    gpus = 1.0 if (args.device or "").startswith("cuda") or (args.device is None and torch.cuda.is_available()) else 0.0
    return ray_app.run(spec, args.replicas, args.host, args.port, args.ray_address, gpus)
