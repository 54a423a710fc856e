"""Engine benchmark: decode ms/token and KV bytes at long contexts, HF full cache vs DBTrimKVCache.

Model: a random Qwen3-VL-shaped text decoder big enough that attention matters (default: 8 layers,
hidden 1024, 16 query / 8 KV heads, head_dim 128), batch 1. For each context length the caches are
filled with random K/V (through the real append path of each cache: `DynamicCache.update`, and the
retention hooks' `stage` + `update` in prefill-sized chunks, evicting as the engine does), then the
model decodes `--steps` tokens and we time each step. Also timed: one eviction at the fixed budget.

Rows (one run, so ratios are meaningful on a noisy machine):
- hf-full:      transformers DynamicCache + sdpa (what the engine replaces)
- ours-full:    DBTrimKVCache with a budget that holds everything (target: <= 1.5x hf-full per step)
- ours-M{M}:    DBTrimKVCache at a fixed budget of M entries per head (targets: 16k within 1.2x of 1k,
                KV bytes at 16k <= the stated bound budget + L*H*max(buffer, chunk) entries)

    python bench/bench_engine.py --out bench/results/engine_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import dbtrimkv  # first: on CPU-only torch it makes torchvision (and so transformers' models) importable
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM  # noqa: E402
from dbtrimkv.transformers_compat import cache_kwargs  # noqa: E402


def build_model(layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, dtype, device):
    config = Qwen3Config(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                         max_position_embeddings=1 << 17)
    torch.manual_seed(0)
    plain = Qwen3ForCausalLM(config).to(device=device, dtype=dtype).eval()
    torch.manual_seed(0)
    gated = Qwen3ForCausalLM(config).to(device=device, dtype=dtype).eval()
    dbtrimkv.attach_retention_gates(gated)
    return plain, gated


def fill_dynamic(config, context: int, dtype, device) -> DynamicCache:
    cache = DynamicCache(config=config)
    shape = (1, config.num_key_value_heads, context, config.head_dim)
    for layer in range(config.num_hidden_layers):
        cache.update(torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device),
                     layer)
    return cache


def fill_retention(model, config, context: int, eviction: dbtrimkv.DBTrimKVConfig, dtype, device):
    """Append `context` random tokens chunk by chunk through the cache's own staging/append path."""
    cache = dbtrimkv.DBTrimKVCache(model, eviction)
    gen = torch.Generator(device="cpu").manual_seed(1)
    heads, dim = config.num_key_value_heads, config.head_dim
    for start in range(0, context, eviction.prefill_chunk):
        n = min(eviction.prefill_chunk, context - start)
        for layer in range(config.num_hidden_layers):
            log_beta = torch.nn.functional.logsigmoid(torch.randn(1, n, heads, generator=gen) * 2 + 4).to(device)
            cache.stage(layer, log_beta, None, dtype)
            k = torch.randn(1, heads, n, dim, generator=gen).to(device=device, dtype=dtype)
            cache.update(k, torch.randn_like(k), layer)
    return cache


def time_decode(model, cache, context: int, steps: int, device) -> list[float]:
    times = []
    token = torch.tensor([[7]], device=device)
    with torch.inference_mode():
        for step in range(steps + 2):
            position = torch.tensor([[context + step]], device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(input_ids=token, position_ids=position, use_cache=True, **cache_kwargs(cache))
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
    return times[2:]  # drop warm-up steps


def time_eviction(model, config, eviction, dtype, device, repeats: int = 5) -> float:
    """ms for one eviction of L*H*buffer entries from a cache at budget + L*H*buffer entries."""
    cache = fill_retention(model, config, 4096, eviction, dtype, device)
    heads, dim = config.num_key_value_heads, config.head_dim
    times = []
    for _ in range(repeats):
        n = eviction.buffer_size
        for layer in range(config.num_hidden_layers):
            cache.stage(layer, torch.zeros(1, n, heads, device=device) - 0.1, None, dtype)
            k = torch.randn(1, heads, n, dim, device=device, dtype=dtype)
            cache.update(k, k, layer)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        cache.evict()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--memory-size", type=int, default=128)
    parser.add_argument("--buffer-size", type=int, default=32)
    parser.add_argument("--prefill-chunk", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default="bench/results/engine.json")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(torch.get_num_threads())
    plain, gated = build_model(args.layers, args.hidden, 16, 8, 128, dtype, device)
    config = plain.config
    lh = config.num_hidden_layers * config.num_key_value_heads
    entry_bytes = 2 * config.head_dim * torch.empty(0, dtype=dtype).element_size()
    fixed = dbtrimkv.DBTrimKVConfig(memory_size=args.memory_size, buffer_size=args.buffer_size,
                                    prefill_chunk=args.prefill_chunk)
    bound_entries = fixed.resolve_budget(config.num_hidden_layers, config.num_key_value_heads) + lh * max(
        args.buffer_size, args.prefill_chunk)
    rows = []
    for context in args.contexts:
        hf = fill_dynamic(config, context, dtype, device)
        hf_ms = time_decode(plain, hf, context, args.steps, device)
        hf_bytes = sum(l.keys.numel() + l.values.numel() for l in hf.layers) * hf.layers[0].keys.element_size()
        del hf
        full = fill_retention(gated, config, context, fixed.replace(budget=None, memory_size=None), dtype, device)
        full_ms = time_decode(gated, full, context, args.steps, device)
        full_bytes = full.storage_bytes()
        del full
        ours = fill_retention(gated, config, context, fixed, dtype, device)
        ours_ms = time_decode(gated, ours, context, args.steps, device)
        rows.append(dict(
            context=context, hf_full_ms=statistics.median(hf_ms), ours_full_ms=statistics.median(full_ms),
            ours_fixed_ms=statistics.median(ours_ms), hf_full_kv_bytes=hf_bytes, ours_full_kv_bytes=full_bytes,
            ours_fixed_kv_bytes=ours.storage_bytes(), ours_fixed_peak_entries=max(ours.peak_entries),
            bound_entries=bound_entries, bound_bytes=bound_entries * entry_bytes,
        ))
        del ours
        print(json.dumps(rows[-1]), flush=True)
    eviction_ms = time_eviction(gated, config, fixed, dtype, device)
    first, last = rows[0], rows[-1]
    result = dict(
        device=str(device), device_name=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        threads=torch.get_num_threads(), dtype=args.dtype, torch=torch.__version__, model=dict(
            layers=args.layers, hidden=args.hidden, heads=16, kv_heads=8, head_dim=128),
        memory_size=args.memory_size, buffer_size=args.buffer_size, prefill_chunk=args.prefill_chunk, rows=rows,
        eviction_ms=eviction_ms,
        checks=dict(
            full_vs_hf_max_ratio=max(r["ours_full_ms"] / r["hf_full_ms"] for r in rows),
            fixed_longest_vs_shortest=last["ours_fixed_ms"] / first["ours_fixed_ms"],
            fixed_bytes_within_bound=all(r["ours_fixed_kv_bytes"] <= r["bound_bytes"] for r in rows),
        ),
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def table(result: dict) -> str:
    mib = 1 / (1 << 20)
    lines = [
        f"device {result['device']} ({result['device_name']}), {result['dtype']}, {result['threads']} threads; "
        f"M={result['memory_size']}, buffer {result['buffer_size']}, chunk {result['prefill_chunk']}",
        "",
        "| context | hf full ms/tok | ours full ms/tok | ratio | ours M ms/tok | hf KV MiB | ours M KV MiB | bound MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['context']} | {r['hf_full_ms']:.1f} | {r['ours_full_ms']:.1f} | "
            f"{r['ours_full_ms'] / r['hf_full_ms']:.2f} | {r['ours_fixed_ms']:.1f} | {r['hf_full_kv_bytes'] * mib:.1f} | "
            f"{r['ours_fixed_kv_bytes'] * mib:.1f} | {r['bound_bytes'] * mib:.1f} |"
        )
    c = result["checks"]
    lines += [
        "",
        f"one eviction (L*H*buffer entries out of budget + L*H*buffer): {result['eviction_ms']:.1f} ms",
        f"ours-full / hf-full (max over contexts): {c['full_vs_hf_max_ratio']:.2f} (target <= 1.5)",
        f"ours-M at longest / shortest context: {c['fixed_longest_vs_shortest']:.2f} (target <= 1.2)",
        f"KV bytes within the stated bound at every context: {c['fixed_bytes_within_bound']}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
