"""Single-request latency of `dbtrimkv serve`: this tree against another commit's, side by side.

Why: a change to the engine must not make one client wait longer (#25: "single-request chat latency
within 1.05x of today's"). Two servers run at once, this working tree's and the one of `--base-tree`
(a `git worktree` of the commit to compare with; its own package is imported, through PYTHONPATH),
each with one torch thread, serving the same model as `bench_serve.py` (tiny-recall, the medium random
text model). One client sends the same streamed request (24 tokens, greedy, `ignore_eos`) to each in
turn, alternating which goes first, `--requests` times per model after 3 warm-up requests each; the
ratio of every pair (this tree / base, each pair taken back to back) and the medians are reported.

    git worktree add /tmp/base 023538a   # the engine before the model runner (#25 was filed on it)
    OMP_NUM_THREADS=1 python bench/bench_serve_latency.py --base-tree /tmp/base --out bench/results/serve_latency.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import MODELS, one_request, prompts  # noqa: E402  (the served models and the client)
from soak_serve import ServeProcess  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def commit_of(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def measure(model: str, base_tree: Path, requests: int, max_tokens: int) -> dict:
    kv = MODELS[model]["kv_memory"]
    servers = {
        "base": ServeProcess("--kv-memory", kv, launcher=[str(base_tree / "bench" / "bench_serve.py"), "--serve", model],
                             env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(base_tree)}),
        "this": ServeProcess("--kv-memory", kv, launcher=[str(ROOT / "bench" / "bench_serve.py"), "--serve", model],
                             env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}),
    }
    latency = {name: [] for name in servers}
    try:
        with httpx.Client() as client:
            message = prompts(model, 1)[0]
            for server in servers.values():
                for _ in range(3):
                    one_request(client, server.base_url, model, message, max_tokens)  # warm-up
            for i in range(requests):
                order = list(servers.items()) if i % 2 == 0 else list(reversed(servers.items()))
                for name, server in order:
                    latency[name].append(one_request(client, server.base_url, model, message, max_tokens)["latency"])
    finally:
        for server in servers.values():
            server.close()
    ratios = [a / b for a, b in zip(latency["this"], latency["base"])]
    return {"model": model, "requests": requests, "latency_s": latency,
            "median_s": {name: statistics.median(v) for name, v in latency.items()},
            "ratio_median": statistics.median(ratios), "ratio_quartiles": statistics.quantiles(ratios, n=4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-tree", type=Path, required=True, help="a git worktree of the commit to compare with")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--requests", type=int, default=30, help="pairs of requests per model")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_latency.json")
    args = parser.parse_args()
    rows = [measure(model, args.base_tree.resolve(), args.requests, args.max_tokens) for model in args.models]
    result = {"base": commit_of(args.base_tree), "this": commit_of(ROOT), "rows": rows, "max_tokens": args.max_tokens}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"Single-request latency, this tree ({result['this']}) vs {result['base']}, {args.max_tokens} tokens streamed:",
             "", "| model | pairs | median s (base) | median s (this) | this / base, median of pairs (quartiles) |",
             "|---|---|---|---|---|"]
    for r in rows:
        q = r["ratio_quartiles"]
        lines.append(f"| {r['model']} | {r['requests']} | {r['median_s']['base']:.4f} | {r['median_s']['this']:.4f} | "
                     f"{r['ratio_median']:.3f} ({q[0]:.3f}-{q[2]:.3f}) |")
    md = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
