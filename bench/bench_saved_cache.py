"""Size and load time of a saved compressed video cache, beside the full cache's size.

For 1, 10 and 60 minutes of the long-video benchmark's synthetic video (`dbtrimkv eval long-video`:
1 fps, 32 px frames, a digit on 3 of them), encode it with the shipped tiny-recall model at memory
size M per (layer, KV head) (global policy), save it (`video_qa.saved.save_encoded`, the
`cache/portable.py` format), load it back (best of `--repeats`), and check that the loaded cache
answers the question exactly as the encoded one does. The full cache's size is what a cache
without eviction would hold for the same tokens (entries x bytes per entry, K and V).

    OMP_NUM_THREADS=1 python bench/bench_saved_cache.py --out bench/results/saved_cache.json   # ~1 min
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from dbtrimkv.loading import checkpoints
from dbtrimkv.settings.config import DBTrimKVConfig
from dbtrimkv.eval.long_video import LongVideo
from dbtrimkv.recall.tasks import VIDEO_QUESTION
from dbtrimkv.video_qa.saved import load_encoded, save_encoded
from dbtrimkv.video_qa.streaming import StreamOptions, ask, encode_windows, frame_windows


def measure(model, processor, minutes: float, memory_size: int, repeats: int, folder: Path) -> dict:
    video = LongVideo(seed=0, minutes=minutes)
    windows = frame_windows(processor, video.frames(), StreamOptions(fps=0, window_frames=16), total=video.num_frames)
    start = time.perf_counter()
    encoded = encode_windows(model, processor, windows, DBTrimKVConfig(memory_size=memory_size, policy="global"))
    encode_seconds = time.perf_counter() - start
    path = folder / f"video-{minutes:g}min.dbkv"
    start = time.perf_counter()
    size = save_encoded(model, encoded, path)
    save_seconds = time.perf_counter() - start
    loads = []
    for _ in range(repeats):
        start = time.perf_counter()
        loaded = load_encoded(model, processor, path)
        loads.append(time.perf_counter() - start)
    want = ask(model, processor, encoded, VIDEO_QUESTION, max_new_tokens=8).text
    got = ask(model, processor, loaded, VIDEO_QUESTION, max_new_tokens=8).text
    cache = encoded.cache
    return {"minutes": minutes, "frames": video.num_frames, "prompt_tokens": sum(encoded.prompt_tokens.values()),
            "entries_kept": cache.num_entries(0), "file_bytes": size,
            "kv_bytes_kept": cache.num_entries(0) * cache.entry_bytes(),
            "full_cache_bytes": cache.full_cache_entries(0) * cache.entry_bytes(),
            "encode_seconds": encode_seconds, "save_seconds": save_seconds, "load_seconds": min(loads),
            "answer": got, "same_answer": got == want}


def markdown(results: dict) -> str:
    mib = 2**20
    lines = [
        "# Saved compressed video cache: size and load time",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Model: tiny-recall ({results['dtype']}, CPU, one torch thread). The long-video benchmark's synthetic "
        f"video (seed 0, 1 fps, 32 px), encoded at memory size M = {results['memory_size']} per (layer, KV head) "
        "(global policy), saved with `video-qa --save-cache`'s format and loaded back (best of "
        f"{results['repeats']}). Full cache: the K/V a cache without eviction would hold for the same tokens.",
        "",
        "| minutes | prompt tokens | entries kept | file (MiB) | kept K/V (MiB) | full cache K/V (MiB) | "
        "file / full | encode (s) | load (s) | same answer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(f"| {r['minutes']:g} | {r['prompt_tokens']} | {r['entries_kept']} | {r['file_bytes'] / mib:.2f} | "
                     f"{r['kv_bytes_kept'] / mib:.2f} | {r['full_cache_bytes'] / mib:.2f} | "
                     f"{r['file_bytes'] / r['full_cache_bytes']:.3f} | {r['encode_seconds']:.2f} | "
                     f"{r['load_seconds']:.3f} | {'yes' if r['same_answer'] else 'NO'} |")
    lines += ["", "The file also holds the prompt's token ids (4 bytes per token) for retention timelines; the rest "
              "is the kept entries (K, V, log beta, position, modality, slot id) and the pool's free list.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60])
    parser.add_argument("--memory-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/saved_cache.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, processor = checkpoints.load_model(None, device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        rows = [measure(model, processor, m, args.memory_size, args.repeats, Path(folder)) for m in args.minutes]
    results = {"command": " ".join(["OMP_NUM_THREADS=1 python bench/bench_saved_cache.py", *sys.argv[1:]]),
               "memory_size": args.memory_size, "repeats": args.repeats,
               "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
