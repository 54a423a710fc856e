"""`dbtrimkv serve --replicas`: throughput of 1 vs 2 Ray Serve engine replicas on one machine.

A local Ray cluster (CPU), the shipped tiny-recall model, each replica on one torch thread behind
the ingress and `KVAwareRouter`. The same load for both: `--requests` image chats from `--clients`
concurrent clients, each generating exactly `--max-tokens` tokens (greedy, `ignore_eos`). Reported:
wall time, generated tokens/s, p50 latency, how the requests spread over the replicas (the
`x-dbtrimkv-replica` header) and the 2-vs-1 ratio. On a 2-core machine the two replicas share the
cores with Ray's ingress, proxy and controller and with the clients, so the ratio stays well under 2.

    python bench/bench_replicas.py --out bench/results/replicas_cpu.json   # ~3 min
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ray
from ray import serve

from dbtrimkv.serving.ray_app import REPLICA_HEADER, ReplicaSpec, build_application
from dbtrimkv.serving.server import ServerOptions

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ["digit-911.png", "digit-912.png", "digit-913.png"]


def _message(digit: str) -> list[dict]:
    uri = "data:image/png;base64," + base64.b64encode((ROOT / "demos" / "examples" / digit).read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": "which digit is in the image?"}]}]


def _one(url: str, digit: str, max_tokens: int) -> tuple[float, int, str]:
    body = {"model": "tiny-recall", "messages": _message(digit), "temperature": 0, "max_tokens": max_tokens,
            "ignore_eos": True}
    start = time.perf_counter()
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    return time.perf_counter() - start, response.json()["usage"]["completion_tokens"], response.headers[REPLICA_HEADER]


def _wait_ready(url: str, replicas: int) -> None:
    deadline = time.monotonic() + 300
    while True:
        try:
            text = httpx.get(url + "/metrics", timeout=30).text
            if text.count("dbtrimkv_requests_running{replica=") >= replicas:
                return
            httpx.get(url + "/health", timeout=30)  # a routed request starts the router's reports
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the replicas did not come up")
        time.sleep(0.5)


def run(url: str, replicas: int, args) -> dict:
    _wait_ready(url, replicas)
    for digit in DIGITS:  # warm-up: every replica's first forwards
        _one(url, digit, 4)
    load = [DIGITS[i % len(DIGITS)] for i in range(args.requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        results = list(pool.map(lambda d: _one(url, d, args.max_tokens), load))
    wall = time.perf_counter() - start
    tokens = sum(r[1] for r in results)
    return {"replicas": replicas, "requests": len(load), "clients": args.clients, "max_tokens": args.max_tokens,
            "wall_seconds": wall, "tokens_per_second": tokens / wall,
            "p50_latency_seconds": statistics.median(r[0] for r in results),
            "requests_per_replica": sorted(Counter(r[2] for r in results).values(), reverse=True)}


def markdown(results: dict) -> str:
    lines = ["# Ray Serve replicas: 1 vs 2 on one machine", "", f"Command: `{results['command']}`", "",
             f"Machine: {results['cpus']} CPU cores. tiny-recall, each replica one torch thread, KV memory "
             f"{results['kv_memory']} per replica. {results['rows'][0]['requests']} image chats from "
             f"{results['rows'][0]['clients']} concurrent clients, {results['rows'][0]['max_tokens']} generated "
             "tokens each (ignore_eos).", "",
             "| replicas | wall (s) | generated tokens/s | p50 latency (s) | requests per replica |",
             "|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['replicas']} | {r['wall_seconds']:.2f} | {r['tokens_per_second']:.1f} | "
                     f"{r['p50_latency_seconds']:.2f} | {' / '.join(map(str, r['requests_per_replica']))} |")
    lines += ["", f"2 replicas vs 1: **{results['ratio']:.2f}x** generated tokens/s. Load average when it started: "
              f"{results['load_average']}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kv-memory-mib", type=float, default=3.5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/replicas_cpu.json"))
    args = parser.parse_args()
    load = f"{os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores"
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    rows = []
    for replicas in (1, 2):
        options = ServerOptions(kv_memory=("bytes", int(args.kv_memory_mib * 2**20)), session_write_through=True,
                                session_store=Path(tempfile.mkdtemp(prefix="dbtrimkv-bench-sessions-")))
        spec = ReplicaSpec(None, "cpu", None, {"config": None, "full_cache": False, "policy_options": None}, options)
        serve.run(build_application(spec, replicas), name="dbtrimkv", route_prefix="/")
        rows.append(run(url, replicas, args))
        print(rows[-1], file=sys.stderr, flush=True)
        serve.delete("dbtrimkv")
    serve.shutdown()
    ray.shutdown()
    results = {"command": " ".join(["python bench/bench_replicas.py", *sys.argv[1:]]), "cpus": os.cpu_count(),
               "kv_memory": f"{args.kv_memory_mib:g} MiB", "rows": rows, "load_average": load,
               "ratio": rows[1]["tokens_per_second"] / rows[0]["tokens_per_second"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
