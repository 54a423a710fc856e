"""`dbtrimkv chat`: ask about images and videos inside a KV budget; print the answer and stats."""

from __future__ import annotations

import sys
import time

from .common import TINY_NOTICE, add_eviction_args, add_media_args, add_model_args, eviction_config, format_bytes


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="ask a question about images and videos",
                       description="Ask one question about images / videos. The answer goes to stdout; prompt "
                                   "tokens by modality, KV memory kept vs a full cache, and timings go to stderr.")
    p.add_argument("question", help="the question")
    add_media_args(p)
    add_model_args(p)
    add_eviction_args(p)
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    p.set_defaults(func=run)


def user_message(question: str, images, videos) -> list[dict]:
    parts = [{"type": "image", "image": path} for path in images]
    parts += [{"type": "video", "video": path} for path in videos]
    parts.append({"type": "text", "text": question})
    return [{"role": "user", "content": parts}]


def run(args) -> int:
    import torch

    from ..cache import DBTrimKVCache
    from ..checkpoints import load_model
    from ..generation import generate
    from ..prompts import VideoOptions, build_inputs, tokenizer_of, tokens_by_modality

    if args.model is None:
        print(TINY_NOTICE, file=sys.stderr)
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    config = eviction_config(args, model)
    messages = user_message(args.question, args.image, args.video)
    inputs = build_inputs(processor, messages, video=VideoOptions(args.video_fps, args.video_max_frames))
    cache = DBTrimKVCache(model, config)
    start = time.perf_counter()
    with torch.inference_mode():
        new_tokens = generate(model, inputs, cache, max_new_tokens=args.max_new_tokens, do_sample=False)[0]
    seconds = time.perf_counter() - start
    print(tokenizer_of(processor).decode(new_tokens, skip_special_tokens=True))
    counts = tokens_by_modality(inputs, 0)
    kept, full = cache.num_entries(0), cache.full_cache_entries(0)
    per_entry = cache.entry_bytes()
    modality = cache.retained_by_modality(0)
    budget = "none (full cache)" if cache.budget is None else f"{cache.budget} entries"
    print(
        f"prompt tokens: {sum(counts.values())} (text {counts['text']}, image {counts['image']}, "
        f"video {counts['video']}) | new tokens: {new_tokens.numel()} | {seconds:.2f} s\n"
        f"KV cache: {kept} entries kept of {full} for a full cache ({format_bytes(kept * per_entry)} of "
        f"{format_bytes(full * per_entry)}) | kept by modality: text {modality['text']}, image {modality['image']}, "
        f"video {modality['video']} | policy {config.policy}, budget {budget}, evictions {cache.num_evictions}",
        file=sys.stderr,
    )
    return 0
