"""Benchmark: `dbtrimkv serve` with the engine in the server's process vs in a process of its own
(`--engine-process`), as streaming clients see it.

Why: in one process the HTTP layer (server-sent events, request parsing, the processor's image
decoding) and the engine thread share one interpreter lock; `--engine-process` moves the engine to
a process of its own (`dbtrimkv/serving/engine_process.py`). What that changes for users is how fast
and how evenly running answers stream, alone and while other requests bring large images.

Per mode (a server each, `tiny-recall`, one torch thread, started once, measured in turns for
`--repeats` rounds), two phases:
- `streams`: 4 clients stream 300-token answers (greedy, `ignore_eos`);
- `streams + images`: the same, while one more client sends, one after another, 6 requests with a
  2048 x 2048 PNG (16 MiB as a data URI) asking for one token.
Reported: the wall time of the phase, the streams' tokens/s, the median / p99 / max gap between two
chunks of one stream (ms), and the image requests' median latency. Medians over the rounds; ratios
engine process / in process within each round.

    OMP_NUM_THREADS=1 python bench/bench_engine_process.py --out bench/results/engine_process_cpu.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak_serve import ServeProcess, sse_events  # noqa: E402  (the one `dbtrimkv serve` subprocess launcher)

ROOT = Path(__file__).resolve().parents[1]
MODES = {"in process": (), "engine process": ("--engine-process",)}
STREAMS, STREAM_TOKENS, IMAGES, IMAGE_SIDE = 4, 300, 6, 2048


def large_image() -> str:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def stream(client: httpx.Client, base: str, gaps: list, tokens: list) -> None:
    body = {"model": "tiny-recall", "messages": [{"role": "user", "content": "tell me a long story"}],
            "max_tokens": STREAM_TOKENS, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    last = None
    with client.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for chunk in sse_events(response):
            if chunk.get("usage"):
                tokens.append(chunk["usage"]["completion_tokens"])
                continue
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now


def images(client: httpx.Client, base: str, image: str, latencies: list) -> None:
    body = {"model": "tiny-recall", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "which digit is in the image?"}]}]}
    for _ in range(IMAGES):
        start = time.perf_counter()
        client.post(base + "/v1/chat/completions", json=body, timeout=600).raise_for_status()
        latencies.append(time.perf_counter() - start)


def phase(client: httpx.Client, base: str, image: str | None) -> dict:
    gaps, tokens, latencies = [], [], []
    threads = [threading.Thread(target=stream, args=(client, base, gaps, tokens)) for _ in range(STREAMS)]
    if image is not None:
        threads.append(threading.Thread(target=images, args=(client, base, image, latencies)))
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    gaps.sort()
    return {"seconds": round(wall, 3), "stream_tokens_per_s": round(sum(tokens) / wall, 1),
            "gap_median_ms": round(1000 * gaps[len(gaps) // 2], 1),
            "gap_p99_ms": round(1000 * gaps[int(0.99 * len(gaps))], 1), "gap_max_ms": round(1000 * gaps[-1], 1),
            "image_latency_median_s": round(statistics.median(latencies), 3) if latencies else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engine_process_cpu.json")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    image = large_image()
    servers = {mode: ServeProcess("--kv-memory", "64MiB", *extra, env={"OMP_NUM_THREADS": "1"})
               for mode, extra in MODES.items()}
    client = httpx.Client(limits=httpx.Limits(max_connections=32, max_keepalive_connections=32))
    rounds = []
    try:
        for server in servers.values():  # warm-up: connections open, first forwards done
            phase(client, server.base_url, None)
        for round_ in range(args.repeats):
            for name, with_images in (("streams", None), ("streams + images", image)):
                for mode, server in servers.items():
                    row = dict(round=round_, mode=mode, phase=name, **phase(client, server.base_url, with_images))
                    rounds.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        client.close()
        for server in servers.values():
            server.close()
    rows = []
    for name in ("streams", "streams + images"):
        for mode in MODES:
            mine = [r for r in rounds if (r["mode"], r["phase"]) == (mode, name)]
            row = {"phase": name, "mode": mode, "rounds": len(mine)}
            for key in ("seconds", "stream_tokens_per_s", "gap_median_ms", "gap_p99_ms", "gap_max_ms",
                        "image_latency_median_s"):
                values = [r[key] for r in mine if r[key] is not None]
                row[key] = statistics.median(values) if values else None
            if mode == "engine process":
                base = {r["round"]: r for r in rounds if (r["mode"], r["phase"]) == ("in process", name)}
                row["tokens_per_s_ratio"] = [round(r["stream_tokens_per_s"] / base[r["round"]]["stream_tokens_per_s"], 2)
                                             for r in mine]
            rows.append(row)
    head = ["phase", "mode", "s", "stream tok/s", "gap median ms", "gap p99 ms", "gap max ms", "image request s",
            "tok/s: engine process / in process (per round)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratios = ", ".join(f"{x:.2f}" for x in r.get("tokens_per_s_ratio", []))
        lines.append("| " + " | ".join(str(x if x is not None else "") for x in (
            r["phase"], r["mode"], r["seconds"], r["stream_tokens_per_s"], r["gap_median_ms"], r["gap_p99_ms"],
            r["gap_max_ms"], r["image_latency_median_s"], ratios)) + " |")
    md = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "rounds": rounds, "repeats": args.repeats, "streams": STREAMS,
                                    "stream_tokens": STREAM_TOKENS, "images": IMAGES, "image_side": IMAGE_SIDE,
                                    "env": {"python": platform.python_version(), "cores": os.cpu_count(),
                                            "load_average": os.getloadavg()}}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
