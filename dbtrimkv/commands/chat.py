"""`dbtrimkv chat`: ask about images and videos inside a KV budget.

With a question: answer once (answer on stdout, stats on stderr). Without one: an interactive
multi-turn chat whose bounded cache persists between turns; lines starting with `/` are
commands (`/image PATH`, `/video PATH` attach media to the next message, `/stats`, `/reset`,
`/exit`).
"""

from __future__ import annotations

import sys

from ..errors import ConfigError, DBTrimKVError
from . import arguments
from .common import (TINY_NOTICE, add_eviction_args, add_media_args, add_model_args, add_progress_arg,
                     eviction_config, show_progress)
from .lazy import lazy

checkpoints = lazy("dbtrimkv.loading.checkpoints")
media = lazy("dbtrimkv.inputs.media")
pipeline = lazy("dbtrimkv.pipeline")
prompts = lazy("dbtrimkv.inputs.prompts")
retention_timeline = lazy("dbtrimkv.reporting.retention_timeline")
stats_text = lazy("dbtrimkv.reporting.stats_text")
EMPTY_ANSWER = "(empty answer)"  # printed instead of a blank line when the model ends at once

HELP = "commands: /image PATH, /video PATH (attach to the next message), /stats, /reset, /exit"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "chat", help="ask about images and videos (one question, or an interactive chat)",
        description="Ask a question about images / videos inside a fixed KV budget. The answer goes to stdout; "
                    "prompt tokens by modality, KV memory kept vs a full cache, and timings go to stderr. "
                    f"Without a question, start an interactive multi-turn chat ({HELP}).",
    )
    p.add_argument("question", nargs="?", default=None, type=arguments.text,
                   help="the question (omit for an interactive chat)")
    add_media_args(p)
    add_model_args(p)
    add_eviction_args(p)
    p.add_argument("--max-new-tokens", type=arguments.new_tokens, default=64, help="tokens to generate at most per answer (default: 64)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=arguments.temperature, default=None, help="sampling temperature (with --sample)")
    p.add_argument("--top-p", type=arguments.top_p, default=None, help="nucleus sampling mass in (0, 1] (with --sample)")
    p.add_argument("--retention-plot", metavar="PATH", default=None,
                   help="write a retention timeline PNG after the answer (interactive: after every turn): "
                        "tokens in order x layers, coloured by the KV heads still holding each token")
    add_progress_arg(p)
    p.set_defaults(func=run)


def load_pipeline(args):
    if args.model is None:
        print(TINY_NOTICE, file=sys.stderr)
    model, processor = checkpoints.load_model(args.model, device=args.device, dtype=args.dtype)
    return pipeline.DBTrimKVPipeline(model, processor, eviction_config(args, model),
                                     video=prompts.VideoOptions(args.video_fps, args.video_max_frames))


def run(args) -> int:
    if args.question is not None and not args.question.strip():
        raise ConfigError("the question is empty: give a question, or none for an interactive chat")
    plot = retention_timeline.check_output(args.retention_plot) if args.retention_plot else None
    progress = show_progress(args)
    pipe = load_pipeline(args)
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                   top_p=args.top_p, progress=progress)
    if args.question is not None:
        out = pipe.chat(args.question, images=args.image, videos=args.video, **options)
        print(out.text if out.text.strip() else EMPTY_ANSWER)
        print(out.stats.summary(), file=sys.stderr)
        if plot is not None:
            _plot(out.cache, pipe, plot)
        return 0
    return interactive(pipe, args.image, args.video, options, plot)


def _plot(cache, pipe, path) -> None:
    retention_timeline.save(cache, retention_timeline.conversation_tokens(cache), pipe.tokenizer, path,
                            title=f"retention timeline ({cache.config.policy}, "
                                  f"{stats_text.budget_words(cache.budget, cache.config.policy)})")
    print(f"retention timeline: {path}", file=sys.stderr)


def interactive(pipe, images, videos, options, plot=None) -> int:
    conversation = pipe.conversation()
    images, videos, last = list(images), list(videos), None
    print(f"Interactive chat; {HELP}.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return 0
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command == "/exit":
                return 0
            if command in ("/image", "/video") and arg.strip():
                path = arg.strip()
                try:
                    _check_media(command, path)
                except DBTrimKVError as exc:
                    print(f"dbtrimkv: error: {exc}; nothing attached", file=sys.stderr)
                    continue
                (images if command == "/image" else videos).append(path)
                print(f"attached {command[1:]} {path} to the next message", file=sys.stderr)
            elif command == "/stats":
                print(last.summary() if last else "new conversation: no answer yet, KV cache empty", file=sys.stderr)
            elif command == "/reset":
                conversation, images, videos, last = pipe.conversation(), [], [], None
                print("new conversation: history, KV cache and attachments cleared", file=sys.stderr)
            else:
                print(HELP, file=sys.stderr)
            continue
        try:
            stream = conversation.send(line, images=images, videos=videos, stream=True, **options)
            print("assistant> ", end="", flush=True)
            for piece in stream:
                print(piece, end="", flush=True)
            print("" if stream.text.strip() else EMPTY_ANSWER)
            last = stream.stats
            if plot is not None:
                _plot(conversation.cache, pipe, plot)
        except DBTrimKVError as exc:  # a bad file should not end the conversation
            print(f"dbtrimkv: error: {exc}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - nor should anything else: report it and go on
            print(f"dbtrimkv: error: this turn failed ({type(exc).__name__}: {exc}); the chat goes on",
                  file=sys.stderr)
        images, videos = [], []


def _check_media(command: str, path: str) -> None:
    """MediaError now, not at the next message, for a path that is missing or not an image / video."""
    if command == "/image":
        media.load_image(path)
    else:
        media.video_info(path)

