"""Serving benchmark: throughput and latency of `dbtrimkv serve` under 1, 4 and 16 concurrent clients.

For each model the server runs in its own process (one torch thread, so client and server do not
share a GIL) and clients send OpenAI chat requests over HTTP. Two server modes, one run each:
- batched:        continuous batching, --max-running 16 (the default)
- one-at-a-time:  --max-running 1: requests are served one after another (what a server without
                  batching does), the others wait in the queue.
Each model's `--kv-memory` (pool and attention views together) holds about 12 of its requests, so
under 16 clients admission control holds some back (the occupancy trace shows it). Every request
generates exactly `--max-tokens` tokens (`ignore_eos`, greedy), so throughput is comparable.
Reported per (model, mode, clients): requests/s, generated tokens/s, p50 / p99 request latency, p50
time to first token (streamed), and the gain of batching over one-at-a-time. During the 16-client
batched run `/metrics` is sampled every 50 ms: KV entries in use and reserved against the pool, and
bytes of pool + views against `--kv-memory`, over time (JSON + PNG); the peak of the views is the
server's own per-step maximum (`dbtrimkv_kv_views_bytes_peak`), not only what the samples caught.

Models: `tiny-recall` (the shipped toy Qwen3-VL; image chats of ~50 tokens) and a medium random
text model (Qwen3 architecture, 8 layers, hidden 512, 8 / 4 heads, head_dim 64; prompts of ~130
tokens, budget M=32 per head so prompts are evicted).

    OMP_NUM_THREADS=1 nice -n 10 python bench/bench_serve.py --out bench/results/serve_cpu.json
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# kv_memory: pool + views for about 12 requests (tiny-recall: a bound of 96 + 6 x 50 entries of 269 bytes and
# 153 KB of views; medium: 1024 + 32 x ~150 entries of 525 bytes and 3.4 MB of views), so under 16 clients
# admission holds some back
MODELS = {
    "tiny-recall": {"memory_size": 16, "kv_memory": "3.5MiB", "requests": {1: 6, 4: 12, 16: 32}},
    "medium-random": {"memory_size": 32, "kv_memory": "75MiB", "requests": {1: 3, 4: 8, 16: 16}},
}


# --- server process ---------------------------------------------------------------------------
def build_medium():
    import torch
    from transformers import AutoModelForCausalLM

    import dbtrimkv
    from dbtrimkv.tiny import build_config, build_tokenizer

    config = build_config("qwen3")
    config.update(dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=64, layer_types=["full_attention"] * 8))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    dbtrimkv.attach_retention_gates(model)
    return model, build_tokenizer()


def serve(args) -> None:
    import torch
    import uvicorn

    import dbtrimkv
    from dbtrimkv.serving import ServerOptions, create_server
    from dbtrimkv.serving.admission import parse_kv_memory

    torch.set_num_threads(1)
    if args.serve == "tiny-recall":
        model, processor = dbtrimkv.load_model(None)
    else:
        model, processor = build_medium()
    config = dbtrimkv.DBTrimKVConfig(memory_size=MODELS[args.serve]["memory_size"], prefill_chunk=256)
    options = ServerOptions(model_name=args.serve, kv_memory=parse_kv_memory(args.kv_memory),
                            max_running=args.max_running, max_queue=256)
    app, _ = create_server(model, processor, config, options)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


# --- clients ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, max_running: int, kv_memory: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, __file__, "--serve", model, "--port", str(port), "--max-running",
                             str(max_running), "--kv-memory", kv_memory], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def prompts(model: str, count: int) -> list[list[dict]]:
    if model == "tiny-recall":
        images = sorted((ROOT / "demos" / "examples").glob("digit-*.png"))
        uris = ["data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() for p in images]
        return [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uris[i % len(uris)]}},
                                              {"type": "text", "text": "which digit is in the image?"}]}]
                for i in range(count)]
    words = "the cat sat on a mat while seven birds sang about tea and rain".split()
    return [[{"role": "user", "content": " ".join(words[(i + k) % len(words)] for k in range(28))}]
            for i in range(count)]


def one_request(base: str, model: str, messages, max_tokens: int) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, usage = None, None
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return {"latency": time.perf_counter() - start, "ttft": first, "tokens": usage["completion_tokens"]}


def sample_metrics(base: str, stop: threading.Event, out: list, t0: float) -> None:
    from dbtrimkv.serving.metrics import parse_metrics  # imported (slow) before the timed run starts

    with httpx.Client() as client:
        while not stop.is_set():
            m = parse_metrics(client.get(base + "/metrics", timeout=5).text)
            out.append({"t": round(time.perf_counter() - t0, 3), "in_use": m["dbtrimkv_kv_slots_in_use"],
                        "reserved": m["dbtrimkv_kv_slots_reserved"], "pool": m["dbtrimkv_kv_pool_slots"],
                        "running": m["dbtrimkv_requests_running"], "waiting": m["dbtrimkv_requests_waiting"],
                        "pool_bytes": m["dbtrimkv_kv_pool_bytes"], "views_bytes": m["dbtrimkv_kv_views_bytes"],
                        "views_reserved_bytes": m["dbtrimkv_kv_views_reserved_bytes"],
                        "views_peak_bytes": m["dbtrimkv_kv_views_bytes_peak"], "memory": m["dbtrimkv_kv_memory_bytes"],
                        "views_skipped": m["dbtrimkv_kv_views_skipped_total"]})
            stop.wait(0.05)


def load(base: str, model: str, clients: int, count: int, max_tokens: int, trace: list | None = None) -> dict:
    work = prompts(model, count)
    one_request(base, model, work[0], 2)  # warm-up
    stop, sampler = threading.Event(), None
    t0 = time.perf_counter()
    if trace is not None:
        sampler = threading.Thread(target=sample_metrics, args=(base, stop, trace, t0))
        sampler.start()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda m: one_request(base, model, m, max_tokens), work))
    wall = time.perf_counter() - t0
    stop.set()
    if sampler is not None:
        sampler.join()
    latencies = sorted(r["latency"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": count, "seconds": round(wall, 3),
            "requests_per_s": round(count / wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "latency_p50_s": round(statistics.median(latencies), 3),
            "latency_p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
            "ttft_p50_s": round(statistics.median(r["ttft"] for r in results), 3)}


def table(rows: list[dict]) -> str:
    head = ["model", "mode", "clients", "requests", "req/s", "tok/s", "p50 latency s", "p99 latency s",
            "p50 TTFT s", "batching gain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(x) for x in (
            r["model"], r["mode"], r["clients"], r["requests"], r["requests_per_s"], r["tokens_per_s"],
            r["latency_p50_s"], r["latency_p99_s"], r["ttft_p50_s"], r.get("gain", ""))) + " |")
    return "\n".join(lines)


def plot(traces: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(traces), figsize=(6 * len(traces), 7), squeeze=False)
    for column, (model, trace) in enumerate(traces.items()):
        t = [s["t"] for s in trace]
        ax = axes[0][column]
        ax.plot(t, [s["in_use"] for s in trace], label="KV entries in use")
        ax.plot(t, [s["reserved"] for s in trace], label="reserved (bounds)")
        ax.axhline(trace[0]["pool"], color="k", linestyle="--", label="pool")
        ax.set(title=f"{model}: 16 clients, batched", xlabel="seconds", ylabel="KV entries")
        ax.legend(fontsize=8)
        ax = axes[1][column]
        mib = 2**20
        ax.stackplot(t, [s["pool_bytes"] / mib for s in trace], [s["views_bytes"] / mib for s in trace],
                     labels=["pool (allocated once)", "attention views"])
        ax.plot(t, [(s["pool_bytes"] + s["views_reserved_bytes"]) / mib for s in trace], label="pool + views reserved")
        ax.axhline(trace[0]["memory"] / mib, color="k", linestyle="--", label="--kv-memory")
        ax.set(xlabel="seconds", ylabel="MiB")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_cpu.json")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--kv-memory", default=None, help="pool size for every model (default: per model, above)")
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-running", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    import dbtrimkv.serving.metrics  # noqa: F401  (torch and all: not inside a timed run)
    rows, traces = [], {}
    for model in args.models:
        for mode, max_running in (("batched", 16), ("one-at-a-time", 1)):
            proc, base = start(model, max_running, args.kv_memory or MODELS[model]["kv_memory"])
            try:
                for clients, count in MODELS[model]["requests"].items():
                    if mode == "one-at-a-time" and clients == 1:
                        continue  # the same as batched with one client
                    count = max(clients, count // 4) if args.quick else count
                    trace = [] if (mode, clients) == ("batched", 16) else None
                    row = dict(model=model, mode=mode, **load(base, model, clients, count, args.max_tokens, trace))
                    rows.append(row)
                    if trace is not None:
                        traces[model] = trace
                    print(json.dumps(row), flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
    for row in rows:
        if row["mode"] == "batched" and row["clients"] > 1:
            alone = next(r for r in rows if r["model"] == row["model"] and r["mode"] == "one-at-a-time"
                         and r["clients"] == row["clients"])
            row["gain"] = f"{row['tokens_per_s'] / alone['tokens_per_s']:.2f}x"
    peaks = {m: {"peak_in_use": max(s["in_use"] for s in tr), "peak_reserved": max(s["reserved"] for s in tr),
                 "pool": tr[0]["pool"], "peak_running": max(s["running"] for s in tr),
                 "pool_bytes": tr[0]["pool_bytes"], "kv_memory_bytes": tr[0]["memory"],
                 "peak_views_bytes": tr[-1]["views_peak_bytes"],
                 "peak_views_sampled_bytes": max(s["views_bytes"] for s in tr),
                 "peak_pool_plus_views_bytes": tr[0]["pool_bytes"] + tr[-1]["views_peak_bytes"],
                 "views_skipped": tr[-1]["views_skipped"]} for m, tr in traces.items()}
    import torch

    result = {"rows": rows, "occupancy_peaks": peaks, "occupancy_traces": traces, "max_tokens": args.max_tokens,
              "kv_memory": {m: args.kv_memory or MODELS[m]["kv_memory"] for m in args.models},
              "env": {"python": platform.python_version(), "torch": torch.__version__,
                      "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "server_threads": 1}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    md = table(rows) + "\n\nKV memory under 16 clients (batched): " + "; ".join(
        f"{m}: peak {p['peak_in_use']:.0f} entries in use, {p['peak_reserved']:.0f} reserved, pool {p['pool']:.0f}, "
        f"{p['peak_running']:.0f} running at most; pool {p['pool_bytes'] / 2**20:.2f} MiB + views peak "
        f"{p['peak_views_bytes'] / 2**20:.2f} MiB = {p['peak_pool_plus_views_bytes'] / 2**20:.2f} MiB of "
        f"--kv-memory {p['kv_memory_bytes'] / 2**20:.2f} MiB ({p['views_skipped']:.0f} forwards attended through the pool)"
        for m, p in peaks.items()) + "\n"
    args.out.with_suffix(".md").write_text(md)
    plot(traces, args.out.with_suffix(".png"))
    print(md)


if __name__ == "__main__":
    main()
