"""The `dbtrimkv` command line.

Why: the first thing a user runs is `dbtrimkv chat --image cat.png "what is this?"`. Every
subcommand turns a `DBTrimKVError` (bad image, unknown model, ...) into one line on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time

from .errors import DBTrimKVError

TINY_NOTICE = (
    "Notice: the default tiny model has random weights; its answers are gibberish until a trained "
    "default exists. Pass --model to use a real Qwen3-VL."
)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model: a local directory, a hub id (e.g. ngocbh/DBTrimKV-Qwen3-VL-4B-Instruct) or "
                        "tiny / tiny-moe / tiny-text (default: the embedded tiny model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (bf16 on GPU, fp32 on CPU)")


def _add_media_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file (repeatable)")
    p.add_argument("--video", action="append", default=[], metavar="PATH", help="a video file (repeatable)")
    p.add_argument("--video-fps", type=float, default=2.0, help="frames sampled per second of video (default 2)")
    p.add_argument("--video-max-frames", type=int, default=64, help="at most this many frames per video (default 64)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dbtrimkv", description="Qwen3-VL inside a fixed KV-cache budget.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chat = sub.add_parser("chat", help="ask a question about images and videos",
                          description="Ask one question about images / videos and print the answer with stats.")
    chat.add_argument("question", help="the question")
    _add_media_args(chat)
    _add_model_args(chat)
    chat.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    chat.set_defaults(func=cmd_chat)
    return parser


def _user_message(question: str, images, videos) -> list[dict]:
    parts = [{"type": "image", "image": path} for path in images]
    parts += [{"type": "video", "video": path} for path in videos]
    parts.append({"type": "text", "text": question})
    return [{"role": "user", "content": parts}]


def cmd_chat(args) -> int:
    import torch

    from .loading import load_base_model
    from .prompts import VideoOptions, build_inputs, tokenizer_of, tokens_by_modality

    if args.model is None:
        print(TINY_NOTICE, file=sys.stderr)
    model, processor = load_base_model(args.model, device=args.device, dtype=args.dtype)
    messages = _user_message(args.question, args.image, args.video)
    inputs = build_inputs(processor, messages, video=VideoOptions(args.video_fps, args.video_max_frames))
    inputs = inputs.to(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    print(tokenizer_of(processor).decode(new_tokens, skip_special_tokens=True))
    counts = tokens_by_modality(inputs, 0)
    print(
        f"prompt tokens: {sum(counts.values())} (text {counts['text']}, image {counts['image']}, "
        f"video {counts['video']}) | new tokens: {new_tokens.numel()} | {seconds:.2f} s",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DBTrimKVError as exc:
        print(f"dbtrimkv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
