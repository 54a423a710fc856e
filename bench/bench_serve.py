"""Serving benchmark: throughput of `dbtrimkv serve` under 1, 4 and 16 concurrent clients, against
transformers `generate` on the same 16 requests as one static batch (the limit of perfect batching).

For each model three servers and a static-batch worker run side by side (processes of one torch
thread each, so clients and servers do not share a GIL), started once and measured in turns,
`--repeats` rounds (default 3):
- batched:        the server with continuous batching, --max-running 16 (the default)
- batched, engine process: the same with `--engine-process` (the engine in a process of its own,
                  the HTTP layer and the processor in the server's: two processes, two cores)
- one-at-a-time:  the server with --max-running 1: requests are served one after another (what a
                  server without batching does), the others wait in the queue
- static:         transformers `model.generate` on the 16-client requests as ONE left-padded batch
                  (`dbtrimkv.inputs.prompts.build_inputs`, the same chats and images) with its own full
                  (dense) `DynamicCache`: the same model object the server serves (gates attached; with
                  a dense cache they run but nothing is evicted). Timed from the chats to the last
                  token (processor included, as the server's clients are timed from the request).
Every request generates exactly `--max-tokens` tokens (`ignore_eos` / `min_new_tokens`, greedy), so
throughput is comparable. Clients are threads of this process sharing one keep-alive connection pool
(as a load generator holds one session; a new connection per request cost the client more CPU than
the tiny model's server spent answering, on the same 2 cores). Reported per (model, mode, clients): the median over the rounds and the
range of requests/s and generated tokens/s, p50 / p99 request latency, p50 time to first token
(streamed), the CPU seconds the run cost the server (user + system, its process and an engine process
under it, from /proc) and the clients (this process), the static batch's own CPU seconds; per round,
the gain of batching over one-at-a-time and the server's tokens/s over the static batch's (ratios
within a round: the machine is shared, its load moves between rounds). The CPU columns say where a
ratio comes from: a server that spends more CPU per wave than the static batch cannot match it on a
machine whose cores the clients share.
`--kv-memory` (pool and attention views together) admits all 16 requests at once (the static batch
holds all 16 too). Before the rounds, one 16-client batched run of its own (not timed: sampling
slows the server) samples `/metrics` every 50 ms: KV entries in use and reserved against the pool,
bytes of pool + views against `--kv-memory` (JSON + PNG); the peak of the views is the server's own
per-step maximum (`dbtrimkv_kv_views_bytes_peak`).

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
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak_serve import ServeProcess, sse_events  # noqa: E402  (the one `dbtrimkv serve` subprocess launcher)

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = (1, 4, 16)
# kv_memory: pool + views for all 16 requests at once (tiny-recall: a bound of 96 + 6 x 50 entries of 269 bytes
# and ~150 KB of views each; medium: 1024 + 32 x ~150 entries of 525 bytes and ~3.4 MB of views)
MODELS = {
    "tiny-recall": {"memory_size": 16, "kv_memory": "6MiB", "requests": {1: 4, 4: 8, 16: 16}},
    "medium-random": {"memory_size": 32, "kv_memory": "110MiB", "requests": {1: 2, 4: 8, 16: 16}},
}


# --- server process ---------------------------------------------------------------------------
def build_medium():
    import torch
    from transformers import AutoModelForCausalLM

    import dbtrimkv
    from dbtrimkv.loading.tiny import build_config, build_tokenizer

    config = build_config("qwen3")
    config.update(dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=64, layer_types=["full_attention"] * 8))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    dbtrimkv.attach_retention_gates(model)
    return model, build_tokenizer()


def load_served(name: str):
    """(model, processor) the server and the static batch use."""
    import dbtrimkv

    return dbtrimkv.load_model(None) if name == "tiny-recall" else build_medium()


def serve(args) -> None:
    """The server of one mode, on `--port`: the engine in this process, or (`--engine-process`) in a
    process of its own that builds the same model (`load_served`) and the same settings."""
    import functools

    import torch
    import uvicorn

    import dbtrimkv
    from dbtrimkv.serving import ServerOptions, create_server
    from dbtrimkv.serving.admission import parse_kv_memory

    torch.set_num_threads(1)
    config = dbtrimkv.DBTrimKVConfig(memory_size=MODELS[args.serve]["memory_size"], prefill_chunk=256)
    options = ServerOptions(model_name=args.serve, kv_memory=parse_kv_memory(args.kv_memory),
                            stream_interval=args.stream_interval,
                            max_running=args.max_running, max_queue=256)
    if args.engine_process:
        from dbtrimkv.serving.engine_process import launch_server
        from dbtrimkv.serving.replica_spec import ReplicaSpec

        app, _ = launch_server(ReplicaSpec(None, None, None, {"config": config}, options,
                                           loader=functools.partial(load_served, args.serve)))
    else:
        app, _ = create_server(*load_served(args.serve), config, options)
    # Keep-alive past the client pool's (httpx: 5 s, as uvicorn's default): with equal timeouts the server can
    # close an idle connection just as a client reuses it ("connection reset by peer" in a later round).
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", timeout_keep_alive=60)


def static_worker(args) -> None:
    """transformers `generate` on the 16-client chats as one left-padded batch with a dense cache, once per
    line read from stdin; one JSON line per run on stdout."""
    import torch

    from dbtrimkv.inputs.prompts import build_inputs

    torch.set_num_threads(1)
    model, processor = load_served(args.static)
    chats = prompts(args.static, args.count, local=True)
    tokenizer = getattr(processor, "tokenizer", processor)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def run(count: int, tokens: int) -> dict:
        start, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            inputs = build_inputs(processor, chats[:count])
            out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 pad_token_id=pad)
        wall = time.perf_counter() - start
        generated = (out.shape[1] - inputs["input_ids"].shape[1]) * count
        return {"seconds": round(wall, 3), "cpu_s": round(time.process_time() - cpu, 3),
                "tokens": generated, "tokens_per_s": round(generated / wall, 2),
                "prompt_tokens": int(inputs["attention_mask"].sum()), "width": inputs["input_ids"].shape[1]}

    run(2, 2)  # warm-up
    print("ready", flush=True)
    for _ in sys.stdin:
        print(json.dumps(run(args.count, args.max_tokens)), flush=True)


class StaticBatch:
    """The static-batch worker process (`static_worker`): one `run()` = one timed `generate`."""

    def __init__(self, model: str, count: int, max_tokens: int):
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen([sys.executable, __file__, "--static", model, "--count", str(count),
                                      "--max-tokens", str(max_tokens)], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"static batch worker for {model} failed to start")

    def run(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


# --- clients ----------------------------------------------------------------------------------
def prompts(model: str, count: int, local: bool = False) -> list[list[dict]]:
    """The chats: OpenAI messages for the server, or (`local`) the same chats for `build_inputs`."""
    if model == "tiny-recall":
        images = sorted((ROOT / "demos" / "examples").glob("digit-*.png"))

        def image(i):
            path = images[i % len(images)]
            if local:
                return {"type": "image", "image": str(path)}
            return {"type": "image_url",
                    "image_url": {"url": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()}}

        return [[{"role": "user", "content": [image(i), {"type": "text", "text": "which digit is in the image?"}]}]
                for i in range(count)]
    words = "the cat sat on a mat while seven birds sang about tea and rain".split()
    return [[{"role": "user", "content": " ".join(words[(i + k) % len(words)] for k in range(28))}]
            for i in range(count)]


def one_request(client: httpx.Client, base: str, model: str, messages, max_tokens: int) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, usage = None, None
    with client.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for chunk in sse_events(response):
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif first is None and chunk["choices"] and "content" in chunk["choices"][0]["delta"] \
                    and "role" not in chunk["choices"][0]["delta"]:  # the first token's piece (maybe "")
                first = time.perf_counter() - start
    return {"latency": time.perf_counter() - start, "ttft": first, "tokens": usage["completion_tokens"],
            "prompt_tokens": usage["prompt_tokens"]}


def sample_metrics(base: str, stop: threading.Event, out: list, t0: float) -> None:
    from dbtrimkv.serving.metrics import parse_metrics  # imported (slow) before the timed run starts

    with httpx.Client() as client:
        while not stop.is_set():
            try:
                m = parse_metrics(client.get(base + "/metrics", timeout=30).text)
            except httpx.TimeoutException:  # a starved server (shared CPU) answers late: skip this sample
                continue
            out.append({"t": round(time.perf_counter() - t0, 3), "in_use": m["dbtrimkv_kv_slots_in_use"],
                        "reserved": m["dbtrimkv_kv_slots_reserved"], "pool": m["dbtrimkv_kv_pool_slots"],
                        "running": m["dbtrimkv_requests_running"], "waiting": m["dbtrimkv_requests_waiting"],
                        "pool_bytes": m["dbtrimkv_kv_pool_bytes"], "views_bytes": m["dbtrimkv_kv_views_bytes"],
                        "views_reserved_bytes": m["dbtrimkv_kv_views_reserved_bytes"],
                        "views_peak_bytes": m["dbtrimkv_kv_views_bytes_peak"], "memory": m["dbtrimkv_kv_memory_bytes"],
                        "views_skipped": m["dbtrimkv_kv_views_skipped_total"]})
            stop.wait(0.05)


def load(client: httpx.Client, base: str, model: str, clients: int, count: int, max_tokens: int,
         trace: list | None = None, server_cpu=None) -> dict:
    """`count` requests from `clients` threads; `server_cpu` (a `ServeProcess.cpu_seconds`) adds the CPU seconds
    the server spent meanwhile, beside this process's own (the clients')."""
    work = prompts(model, count)
    stop, sampler = threading.Event(), None
    cpu0 = (server_cpu() if server_cpu else 0.0, time.process_time())
    t0 = time.perf_counter()
    if trace is not None:
        sampler = threading.Thread(target=sample_metrics, args=(base, stop, trace, t0))
        sampler.start()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda m: one_request(client, base, model, m, max_tokens), work))
    wall = time.perf_counter() - t0
    cpu = {"server_cpu_s": round(server_cpu() - cpu0[0], 3)} if server_cpu else {}
    cpu["client_cpu_s"] = round(time.process_time() - cpu0[1], 3)
    stop.set()
    if sampler is not None:
        sampler.join()
    latencies = sorted(r["latency"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": count, "seconds": round(wall, 3),
            "requests_per_s": round(count / wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "prompt_tokens": sum(r["prompt_tokens"] for r in results),
            "latency_p50_s": round(statistics.median(latencies), 3),
            "latency_p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
            # (a first token that is a stop token sends no text: that request has no TTFT)
            "ttft_p50_s": round(statistics.median([r["ttft"] for r in results if r["ttft"] is not None] or [0.0]), 3),
            **cpu}


def spread(values: list[float], digits: int = 2) -> str:
    """`median (min-max)` of one measurement's rounds."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def summarize(rounds: list[dict]) -> list[dict]:
    """One row per (model, mode, clients): medians and ranges over the rounds, and the per-round ratios."""
    rows = []
    keys = list(dict.fromkeys((r["model"], r["mode"], r["clients"]) for r in rounds))
    for model, mode, clients in keys:
        mine = [r for r in rounds if (r["model"], r["mode"], r["clients"]) == (model, mode, clients)]
        row = {"model": model, "mode": mode, "clients": clients, "requests": mine[0]["requests"],
               "rounds": len(mine), "tokens_per_s": [r["tokens_per_s"] for r in mine]}
        for key in ("requests_per_s", "latency_p50_s", "latency_p99_s", "ttft_p50_s", "server_cpu_s", "cpu_s",
                    "client_cpu_s"):
            if key in mine[0]:
                row[key] = statistics.median(r[key] for r in mine)
        if mode.startswith("batched"):
            for other, name in (("one-at-a-time", "gain_vs_one_at_a_time"), ("static", "vs_static")):
                base = {r["round"]: r for r in rounds if (r["model"], r["mode"], r["clients"]) == (model, other, clients)}
                ratios = [r["tokens_per_s"] / base[r["round"]]["tokens_per_s"] for r in mine if r["round"] in base]
                if ratios:
                    row[name] = ratios
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ["model", "mode", "clients", "requests", "tok/s median (range)", "p50 latency s", "p99 latency s",
            "p50 TTFT s", "server CPU s", "client CPU s", "batched / one-at-a-time", "batched / static batch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = {k: spread(r[k]) + "x" if k in r else "" for k in ("gain_vs_one_at_a_time", "vs_static")}
        lines.append("| " + " | ".join(str(x) for x in (
            r["model"], r["mode"], r["clients"], r["requests"], spread(r["tokens_per_s"], 1),
            r.get("latency_p50_s", ""), r.get("latency_p99_s", ""), r.get("ttft_p50_s", ""),
            r.get("server_cpu_s", r.get("cpu_s", "")), r.get("client_cpu_s", ""),
            ratio["gain_vs_one_at_a_time"], ratio["vs_static"])) + " |")
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


def measure_model(args, model: str, rounds: list, traces: dict) -> None:
    """Start the two servers and the static worker, then measure them in turns, `--repeats` rounds."""
    requests = {c: (max(c, n // 2) if args.quick else n) for c, n in MODELS[model]["requests"].items()}
    kv = args.kv_memory or MODELS[model]["kv_memory"]
    servers = {mode: ServeProcess("--max-running", str(running), "--kv-memory", kv, *extra,
                                  "--stream-interval", str(args.stream_interval),
                                  launcher=[__file__, "--serve", model], env={"OMP_NUM_THREADS": "1"})
               for mode, running, extra in (("batched", 16, ()), ("batched, engine process", 16, ("--engine-process",)),
                                            ("one-at-a-time", 1, ()))}
    static = StaticBatch(model, requests[16], args.max_tokens)
    # one connection pool for all clients, kept alive across rounds (as a load generator does: vLLM's
    # benchmark_serving holds one aiohttp session); a new client per request spent more CPU setting up
    # connections than the tiny model's server spent answering, and spread the 16 arrivals over ~0.2 s
    client = httpx.Client(limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
    try:
        for server in servers.values():
            for _ in range(2):
                load(client, server.base_url, model, 16, 16, 2)  # warm-up: 16 connections open
        traces[model] = []  # KV occupancy under 16 clients: a run of its own (sampling /metrics loads the server)
        load(client, servers["batched"].base_url, model, 16, requests[16], args.max_tokens, traces[model])
        for round_ in range(args.repeats):
            for clients in CLIENTS:
                for mode, server in servers.items():
                    if mode == "one-at-a-time" and clients == 1:
                        continue  # the same as batched with one client
                    row = dict(model=model, mode=mode, round=round_,
                               **load(client, server.base_url, model, clients, requests[clients], args.max_tokens,
                                      server_cpu=server.cpu_seconds))
                    rounds.append(row)
                    print(json.dumps(row), flush=True)
            row = dict(model=model, mode="static", round=round_, clients=16, requests=requests[16], **static.run())
            rounds.append(row)
            print(json.dumps(row), flush=True)
    finally:
        client.close()
        static.close()
        for server in servers.values():
            server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_cpu.json")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every measurement, taken in turns")
    parser.add_argument("--kv-memory", default=None, help="pool size for every model (default: per model, above)")
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="every server's --stream-interval (default 1: a chunk per token)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--static", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-running", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--engine-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    if args.static:
        static_worker(args)
        return
    import dbtrimkv.serving.metrics  # noqa: F401  (torch and all: not inside a timed run)
    rounds, traces = [], {}
    started = time.perf_counter()
    for model in args.models:
        measure_model(args, model, rounds, traces)
    rows = summarize(rounds)
    peaks = {m: {"peak_in_use": max(s["in_use"] for s in tr), "peak_reserved": max(s["reserved"] for s in tr),
                 "pool": tr[0]["pool"], "peak_running": max(s["running"] for s in tr),
                 "pool_bytes": tr[0]["pool_bytes"], "kv_memory_bytes": tr[0]["memory"],
                 "peak_views_bytes": tr[-1]["views_peak_bytes"],
                 "peak_views_sampled_bytes": max(s["views_bytes"] for s in tr),
                 "peak_pool_plus_views_bytes": tr[0]["pool_bytes"] + tr[-1]["views_peak_bytes"],
                 "views_skipped": tr[-1]["views_skipped"], "samples": len(tr)} for m, tr in traces.items() if tr}
    prompt_check = {m: {"server_16_clients": next(r["prompt_tokens"] for r in rounds if r["model"] == m
                                                  and r["mode"] == "batched" and r["clients"] == 16),
                        "static_batch": next(r["prompt_tokens"] for r in rounds if r["model"] == m
                                             and r["mode"] == "static")} for m in args.models}
    import torch

    result = {"rows": rows, "rounds": rounds, "prompt_tokens": prompt_check, "occupancy_peaks": peaks,
              "occupancy_traces": traces, "max_tokens": args.max_tokens, "repeats": args.repeats,
              "stream_interval": args.stream_interval,
              "seconds": round(time.perf_counter() - started, 1),
              "kv_memory": {m: args.kv_memory or MODELS[m]["kv_memory"] for m in args.models},
              "env": {"python": platform.python_version(), "torch": torch.__version__,
                      "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "server_threads": 1,
                      "load_average": os.getloadavg()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    md = table(rows) + f"\n\nServers' --stream-interval: {args.stream_interval}; max tokens {args.max_tokens}; " + \
        f"repeats {args.repeats}.\n\nPrompt tokens (server's usage vs the static batch's mask): " + "; ".join(
        f"{m}: {p['server_16_clients']} / {p['static_batch']}" for m, p in prompt_check.items())
    md += "\n\nKV memory under 16 clients (batched): " + "; ".join(
        f"{m} ({p['samples']} samples): peak {p['peak_in_use']:.0f} entries in use, {p['peak_reserved']:.0f} reserved, pool {p['pool']:.0f}, "
        f"{p['peak_running']:.0f} running at most; pool {p['pool_bytes'] / 2**20:.2f} MiB + views peak "
        f"{p['peak_views_bytes'] / 2**20:.2f} MiB = {p['peak_pool_plus_views_bytes'] / 2**20:.2f} MiB of "
        f"--kv-memory {p['kv_memory_bytes'] / 2**20:.2f} MiB ({p['views_skipped']:.0f} forwards attended through the pool)"
        for m, p in peaks.items()) + "\n"
    args.out.with_suffix(".md").write_text(md)
    plot(traces, args.out.with_suffix(".png"))
    print(md)


if __name__ == "__main__":
    main()
