"""Where the server's time goes against the static batch: the engine alone, without HTTP.

Why: `bench_serve.py` times 16 HTTP clients against transformers `generate` on the same 16 requests as
one static batch. This script takes HTTP, JSON, image upload and the processor out: the 16 requests'
inputs are built once, then handed to the server's `Engine` in this process, all at once, and timed
until every one has its `--max-tokens` tokens. Beside it, in the same process and in turns, the static
batch (`generate` with a full dense cache, inputs prebuilt too). With one token that is prefill and the
first token; with `--max-tokens` the whole run; the difference over `max_tokens - 1` is the cost of one
decode step of 16 rows. Same models, prompts and settings as `bench_serve.py`.

    OMP_NUM_THREADS=1 nice -n 10 python bench/serve_breakdown.py --out bench/results/serve_breakdown_cpu.json
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve  # noqa: E402  (the served models, their prompts and settings)

import dbtrimkv  # noqa: E402
from dbtrimkv.inputs.prompts import build_inputs  # noqa: E402
from dbtrimkv.runner.sampling import SamplingParams  # noqa: E402
from dbtrimkv.serving import ServerOptions  # noqa: E402
from dbtrimkv.serving.admission import parse_kv_memory  # noqa: E402
from dbtrimkv.serving.engine import EngineRequest  # noqa: E402
from dbtrimkv.serving.server import create_engine  # noqa: E402


def measure(name: str, tokens: list[int], rounds: int) -> list[dict]:
    model, processor = bench_serve.load_served(name)
    settings = bench_serve.MODELS[name]
    config = dbtrimkv.DBTrimKVConfig(memory_size=settings["memory_size"], prefill_chunk=256)  # as bench_serve serves
    engine = create_engine(model, processor, config, ServerOptions(  # the engine `dbtrimkv serve` builds
        model_name=name, kv_memory=parse_kv_memory(settings["kv_memory"]), max_running=16, max_queue=256))
    engine.start()
    chats = bench_serve.prompts(name, 16, local=True)
    one_each = [build_inputs(processor, [chat]) for chat in chats]
    batch = build_inputs(processor, chats)
    tokenizer = getattr(processor, "tokenizer", processor)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def engine_run(count: int) -> float:
        start, sinks = time.perf_counter(), []
        for i, inputs in enumerate(one_each):
            events: queue.Queue = queue.Queue()
            engine.submit(EngineRequest(f"r{time.monotonic_ns()}-{i}", inputs, config,
                                        SamplingParams(max_tokens=count, temperature=0, ignore_eos=True), events.put))
            sinks.append(events)
        for events in sinks:
            while (event := events.get(timeout=600)).kind == "token":
                pass
            assert event.kind == "done", event.error
        return time.perf_counter() - start

    def static_run(count: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=count, min_new_tokens=count, do_sample=False, pad_token_id=pad)
        return time.perf_counter() - start

    for run in (engine_run, static_run):  # warm-up
        run(2)
    rows = []
    try:
        for count in tokens:
            times = {"engine": [], "static": []}
            for _ in range(rounds):
                times["engine"].append(engine_run(count))
                times["static"].append(static_run(count))
            ratios = [s / e for e, s in zip(times["engine"], times["static"])]
            rows.append({"model": name, "max_tokens": count, "engine_s": statistics.median(times["engine"]),
                         "static_s": statistics.median(times["static"]), "ratio": statistics.median(ratios),
                         "ratio_min": min(ratios), "ratio_max": max(ratios)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        engine.stop()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | max tokens | engine alone s (median) | static batch s | static / engine (tokens/s ratio), range |",
             "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['max_tokens']} | {r['engine_s']:.3f} | {r['static_s']:.3f} | "
                     f"{r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |")
    steps = {}
    for r in rows:
        steps.setdefault(r["model"], []).append(r)
    for model, mine in steps.items():
        mine = sorted(mine, key=lambda r: r["max_tokens"])
        if len(mine) >= 2 and mine[-1]["max_tokens"] > mine[0]["max_tokens"]:
            n = mine[-1]["max_tokens"] - mine[0]["max_tokens"]
            lines.append(f"\n{model}: one decode step of 16 rows, engine {1000 * (mine[-1]['engine_s'] - mine[0]['engine_s']) / n:.1f} ms, "
                         f"static {1000 * (mine[-1]['static_s'] - mine[0]['static_s']) / n:.1f} ms; prefill and first token "
                         f"(max tokens {mine[0]['max_tokens']}): engine {1000 * mine[0]['engine_s']:.0f} ms, "
                         f"static {1000 * mine[0]['static_s']:.0f} ms")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(bench_serve.MODELS), choices=list(bench_serve.MODELS))
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[1, 24])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve_breakdown_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [row for name in args.models for row in measure(name, args.max_tokens, args.rounds)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "rounds": args.rounds, "torch": torch.__version__,
                                    "command": "python bench/serve_breakdown.py " + " ".join(sys.argv[1:])},
                                   indent=2) + "\n")
    text = table(rows)
    args.out.with_suffix(".md").write_text(f"# The engine alone against the static batch\n\nCommand: "
                                           f"`OMP_NUM_THREADS=1 python bench/serve_breakdown.py {' '.join(sys.argv[1:])}`\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
