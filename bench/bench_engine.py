"""Engine benchmark: prefill and decode at 1k-32k tokens, DBTrimKVCache against transformers' caches.

Model: a random Qwen3-shaped text decoder (default 8 layers, hidden 1024, 16 query / 8 KV heads,
head_dim 128, float32), batch 1, the same weights in a plain copy and in a copy with rg10 gates.
Every row is measured in this one run (decode rows interleaved step by step), so the ratios compare
like with like on a noisy machine. Pin it to one core: `taskset -c 1` and `OMP_NUM_THREADS=1`. Times
are the process's CPU time on CPU (wall time on CUDA): on a shared machine that counts the work a
path does, not the time it waited for a core (the JSON's `seconds` is the run's wall time).

Prefill of a random `context`-token prompt (seconds; peak RSS above the RSS before the call):
- hf-dynamic:   plain model, one forward over the prompt into a `DynamicCache` (`logits_to_keep=1`,
                what `generate` does); up to `--hf-prefill-max` tokens (it is quadratic)
- hf-static:    the same into a `StaticCache`; up to `--extra-prefill-max`
- gated-dynamic: the gated model (gates run, nothing evicted) into a `DynamicCache`; up to
                `--extra-prefill-max`: the cost of the gates alone
- ours-M:       `dbtrimkv.generation.prefill` in `--prefill-chunk` chunks at M entries per head,
                evicting before each chunk (the real path), at every context
Decode (ms per token, mean over the steps after 2 warm-up steps):
- ours-M:       continues the cache the prefill left, `--decode-steps` steps (>= buffer_size, so the
                mean includes the evictions)
- snapkv-M, h2o-M (`--policies`): the same engine and budget under a baseline policy that reads
                attention statistics, continuing a cache prefilled (chunked, evicting, not timed)
                with the last `--policy-prefill-max` tokens of the prompt (decode at a fixed budget
                does not depend on how long the prompt was)
- dense-M:      the limit of this design: the gated model (gates run, nothing evicted) over a plain
                contiguous cache that starts with M entries per head and grows like ours (the same
                mean size over the steps): a `StaticCache` (preallocated) and a `DynamicCache`
- dense-M plain: the plain model (no gates) over a `DynamicCache` of M entries: what a user of a
                dense-cache compressor (kvpress) runs at the kept size; ours / it includes the gates
`--rounds R` repeats the fixed-budget decode R times (each round continues the caches), so the
native-path table gives every ratio's median and range over the rounds.
- ours-full / hf-dynamic / hf-static: budget >= length: a `DBTrimKVCache` holding everything and
                transformers' caches, filled with `context` random entries through their own append
                paths, `--full-steps` steps, up to `--full-max` tokens

    OMP_NUM_THREADS=1 taskset -c 1 python bench/bench_engine.py --out bench/results/engine_cpu.json

`--skip` leaves sections out (`hf-prefill`, `full`, `policies`) for partial reruns.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import re
import statistics
import time
from pathlib import Path

import torch

import dbtrimkv  # first: on CPU-only torch it makes torchvision (and so transformers' models) importable
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM, StaticCache  # noqa: E402
from dbtrimkv.generation import prefill  # noqa: E402
from dbtrimkv.modeling.transformers_compat import cache_kwargs  # noqa: E402

WARMUP = 2
MIB = 1 << 20


def build_models(layers: int, hidden: int, dtype, device):
    config = Qwen3Config(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=1 << 17)
    torch.manual_seed(0)
    plain = Qwen3ForCausalLM(config).to(device=device, dtype=dtype).eval()
    torch.manual_seed(0)  # its own config: attaching gates switches the config's attention to `dbtrimkv`
    gated = Qwen3ForCausalLM(copy.deepcopy(config)).to(device=device, dtype=dtype).eval()
    dbtrimkv.attach_retention_gates(gated)
    assert plain.config._attn_implementation == "sdpa", plain.config._attn_implementation  # HF's own best path
    return plain, gated


# --- memory ----------------------------------------------------------------------------------------
def _status(field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


def rss() -> int:
    return _status("VmRSS")


def reset_peak() -> None:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")


def peak() -> int:
    return _status("VmHWM")


# --- caches ----------------------------------------------------------------------------------------
def random_fill(cache, config, tokens: int, dtype, device, gen: torch.Generator):
    """Append `tokens` random K/V entries per layer and head through the cache's own `update`."""
    shape = (1, config.num_key_value_heads, tokens, config.head_dim)
    for layer in range(config.num_hidden_layers):
        k = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        cache.update(k, torch.randn(shape, generator=gen).to(device=device, dtype=dtype), layer)
    return cache


def given_log_beta(hidden: torch.Tensor) -> torch.Tensor:
    """A "gate" for `DBTrimKVCache.stage` whose input is the log beta itself (in the K/V dtype: the
    cache takes its K/V dtype from the gate input)."""
    return hidden.float()


def retention_fill(model, config, tokens: int, eviction, dtype, device, gen: torch.Generator):
    """A DBTrimKVCache with `tokens` random entries per layer and head, through its staging/append path."""
    cache = dbtrimkv.DBTrimKVCache(model, eviction)
    heads, dim = config.num_key_value_heads, config.head_dim
    for start in range(0, tokens, eviction.prefill_chunk):
        n = min(eviction.prefill_chunk, tokens - start)
        for layer in range(config.num_hidden_layers):
            log_beta = torch.nn.functional.logsigmoid(torch.randn(1, n, heads, generator=gen) * 2 + 4).to(device)
            cache.stage(layer, given_log_beta, log_beta.to(dtype), None)
            k = torch.randn(1, heads, n, dim, generator=gen).to(device=device, dtype=dtype)
            cache.update(k, torch.randn_like(k), layer)
    return cache


# --- timing ----------------------------------------------------------------------------------------
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock(device) -> float:
    """Seconds on the clock the ratios use: this process's CPU time on CPU (on a shared machine it
    counts the work done, not the time spent waiting for a core), wall time on CUDA."""
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def timed_prefill(run, device) -> tuple[float, int, object]:
    """(seconds, peak RSS above the RSS before the call, result) of `run()`."""
    reset_peak()
    before = rss()
    _sync(device)
    start = clock(device)
    with torch.inference_mode():
        result = run()
    _sync(device)
    return clock(device) - start, peak() - before, result


def decode_interleaved(runners: dict, steps: int, device) -> dict[str, float]:
    """Mean ms per decode step of each runner `name -> (model, cache, next position)`, one step of each
    in turn (so load from other processes hits them alike); the first WARMUP steps are not counted."""
    times = {name: [] for name in runners}
    position = {name: start for name, (_, _, start) in runners.items()}
    token = torch.tensor([[7]], device=device)
    with torch.inference_mode():
        for step in range(steps + WARMUP):
            for name, (model, cache, _) in runners.items():
                ids = torch.tensor([[position[name]]], device=device)
                _sync(device)
                start = clock(device)
                model(input_ids=token, position_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
                _sync(device)
                if step >= WARMUP:
                    times[name].append((clock(device) - start) * 1000)
                position[name] += 1
    return {name: statistics.fmean(t) for name, t in times.items()}


def time_eviction(model, config, eviction, dtype, device, repeats: int = 5) -> float:
    """ms of one eviction of L*H*buffer entries from a cache at budget + L*H*buffer entries."""
    gen = torch.Generator().manual_seed(3)
    cache = retention_fill(model, config, 4096, eviction, dtype, device, gen)
    heads, dim = config.num_key_value_heads, config.head_dim
    times = []
    for _ in range(repeats):
        n = eviction.buffer_size
        for layer in range(config.num_hidden_layers):
            cache.stage(layer, given_log_beta, torch.full((1, n, heads), -0.1, device=device, dtype=dtype), None)
            k = torch.randn(1, heads, n, dim, device=device, dtype=dtype)
            cache.update(k, k, layer)
        _sync(device)
        start = clock(device)
        cache.evict()
        _sync(device)
        times.append((clock(device) - start) * 1000)
    return statistics.median(times)


def warm_up(plain, gated, fixed, device) -> None:
    """One short prefill and decode step through every path, so no timed call pays first-call costs."""
    ids = torch.randint(0, plain.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        for model in (plain, gated):
            plain_cache = DynamicCache(config=plain.config)
            model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(plain_cache))
        ours = dbtrimkv.DBTrimKVCache(gated, fixed)
        prefill(gated, {"input_ids": ids}, ours, chunk=128)
    decode_interleaved({"ours": (gated, ours, 300), "plain": (plain, plain_cache, 300)}, 2, device)


# --- one context -----------------------------------------------------------------------------------
def measure_context(args, context: int, plain, gated, fixed, dtype, device) -> dict:
    config = plain.config
    gen = torch.Generator().manual_seed(context)
    ids = torch.randint(0, config.vocab_size, (1, context), generator=gen).to(device)
    row: dict = dict(context=context)

    def hf_prefill(model, cache):
        return lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))

    if context <= args.hf_prefill_max and "hf-prefill" not in args.skip:
        row["hf_dynamic_prefill_s"], row["hf_dynamic_prefill_peak_bytes"], _ = timed_prefill(
            hf_prefill(plain, DynamicCache(config=config)), device)
    if context <= args.extra_prefill_max:
        static = StaticCache(config=config, max_cache_len=context)
        row["hf_static_prefill_s"], row["hf_static_prefill_peak_bytes"], _ = timed_prefill(
            hf_prefill(plain, static), device)
        del static
        row["gated_dynamic_prefill_s"], row["gated_dynamic_prefill_peak_bytes"], _ = timed_prefill(
            hf_prefill(gated, DynamicCache(config=config)), device)
    gc.collect()
    ours = dbtrimkv.DBTrimKVCache(gated, fixed)
    row["ours_prefill_s"], row["ours_prefill_peak_bytes"], _ = timed_prefill(
        lambda: prefill(gated, {"input_ids": ids}, ours, chunk=args.prefill_chunk), device)
    print(json.dumps(row), flush=True)

    # decode at the fixed budget vs the dense cache of the same size (the limit), and the baseline policies
    m = args.memory_size
    dense_static = random_fill(StaticCache(config=config, max_cache_len=m + args.decode_steps + WARMUP), config, m,
                               dtype, device, gen)
    dense_dynamic = random_fill(DynamicCache(config=config), config, m, dtype, device, gen)
    dense_plain = random_fill(DynamicCache(config=config), config, m, dtype, device, gen)
    runners = {"ours": (gated, ours, context), "dense_static": (gated, dense_static, m),
               "dense_dynamic": (gated, dense_dynamic, m), "dense_plain": (plain, dense_plain, m)}
    tail = ids[:, -min(context, args.policy_prefill_max):]
    for policy in [] if "policies" in args.skip else args.policies:
        cache = dbtrimkv.DBTrimKVCache(gated, fixed.replace(policy=policy))
        with torch.inference_mode():
            prefill(gated, {"input_ids": tail}, cache, chunk=args.prefill_chunk)
        runners[policy] = (gated, cache, tail.shape[1])
    rounds = []
    for _ in range(args.rounds):  # each round continues every cache by `decode_steps` more steps
        rounds.append(decode_interleaved(runners, args.decode_steps, device))
        if len(rounds) < args.rounds:  # a fresh static cache: it holds one round's steps
            runners["dense_static"] = (gated, random_fill(StaticCache(config=config, max_cache_len=m + args.decode_steps
                                                                      + WARMUP), config, m, dtype, device, gen), m)
    decode = {name: statistics.fmean(r[name] for r in rounds) for name in runners}
    row.update(ours_decode_ms=decode["ours"], dense_static_decode_ms=decode["dense_static"],
               dense_dynamic_decode_ms=decode["dense_dynamic"], dense_plain_decode_ms=decode["dense_plain"],
               decode_rounds=rounds,
               ours_kv_bytes=ours.storage_bytes(), ours_views_bytes=ours.views_bytes(),
               ours_peak_entries=max(ours.peak_entries), evictions=ours.num_evictions)
    for policy in runners.keys() - {"ours", "dense_static", "dense_dynamic", "dense_plain"}:
        row[f"{policy}_decode_ms"] = decode[policy]
        row[f"{policy}_prefill_tokens"] = tail.shape[1]
    del ours, dense_static, dense_dynamic, dense_plain, runners
    gc.collect()

    # budget >= length: everything cached
    if context <= args.full_max and "full" not in args.skip:
        total = context + args.full_steps + WARMUP
        runners = {
            "hf_dynamic": (plain, random_fill(DynamicCache(config=config), config, context, dtype, device, gen), context),
            "hf_static": (plain, random_fill(StaticCache(config=config, max_cache_len=total), config, context, dtype,
                                             device, gen), context),
            "ours_full": (gated, retention_fill(gated, config, context, fixed.replace(budget=None, memory_size=None),
                                                dtype, device, gen), context),
        }
        decode = decode_interleaved(runners, args.full_steps, device)
        row.update({f"{name}_decode_ms": ms for name, ms in decode.items()})
        row["ours_full_kv_bytes"] = runners["ours_full"][1].storage_bytes()
        row["ours_full_views_bytes"] = runners["ours_full"][1].views_bytes()
        row["hf_dynamic_kv_bytes"] = sum(l.keys.numel() + l.values.numel() for l in runners["hf_dynamic"][1].layers) \
            * runners["hf_dynamic"][1].layers[0].keys.element_size()
        del runners
        gc.collect()
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--memory-size", type=int, default=128)
    parser.add_argument("--buffer-size", type=int, default=32)
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of the fixed-budget decode (each `--decode-steps` steps, interleaved); the "
                             "table gives each ratio's median and range over the rounds")
    parser.add_argument("--full-steps", type=int, default=6)
    parser.add_argument("--hf-prefill-max", type=int, default=32768)
    parser.add_argument("--extra-prefill-max", type=int, default=4096)
    parser.add_argument("--full-max", type=int, default=32768)
    parser.add_argument("--policies", nargs="*", default=["snapkv", "h2o"])
    parser.add_argument("--policy-prefill-max", type=int, default=4096)
    parser.add_argument("--skip", nargs="*", default=[], choices=["hf-prefill", "full", "policies"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default="bench/results/engine.json")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    started = time.perf_counter()
    plain, gated = build_models(args.layers, args.hidden, dtype, device)
    config = plain.config
    lh = config.num_hidden_layers * config.num_key_value_heads
    entry_bytes = 2 * config.head_dim * torch.empty(0, dtype=dtype).element_size()
    fixed = dbtrimkv.DBTrimKVConfig(memory_size=args.memory_size, buffer_size=args.buffer_size,
                                    prefill_chunk=args.prefill_chunk)
    budget = fixed.resolve_budget(config.num_hidden_layers, config.num_key_value_heads)
    bound_entries = budget + lh * max(args.buffer_size, args.prefill_chunk)
    model_bytes = sum(p.numel() * p.element_size() for p in gated.parameters())
    warm_up(plain, gated, fixed, device)
    rows = [measure_context(args, context, plain, gated, fixed, dtype, device) for context in args.contexts]
    result = dict(
        device=str(device), device_name=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        threads=torch.get_num_threads(), dtype=args.dtype, torch=torch.__version__,
        model=dict(layers=args.layers, hidden=args.hidden, heads=16, kv_heads=8, head_dim=128),
        gated_model_bytes=model_bytes, memory_size=args.memory_size, buffer_size=args.buffer_size,
        prefill_chunk=args.prefill_chunk, policies=[] if "policies" in args.skip else args.policies,
        skipped=args.skip, budget_entries=budget, bound_entries=bound_entries,
        bound_bytes=bound_entries * entry_bytes, decode_steps=args.decode_steps, full_steps=args.full_steps,
        rows=rows, eviction_ms=time_eviction(gated, config, fixed, dtype, device),
        seconds=time.perf_counter() - started,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    table_text = table(result)
    Path(args.out).with_suffix(".md").write_text(table_text + "\n")
    print(table_text)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def _num(value, fmt: str) -> str:
    return format(value, fmt) if value is not None else "-"


def table(result: dict) -> str:
    rows = result["rows"]
    lines = [
        f"device {result['device']} ({result['device_name'] or 'cpu'}), {result['dtype']}, {result['threads']} "
        f"thread(s); M={result['memory_size']} (budget {result['budget_entries']} entries), buffer "
        f"{result['buffer_size']}, chunk {result['prefill_chunk']}; {result['seconds'] / 60:.1f} min",
        "",
        "Prefill, CPU seconds (ratio = ours / hf-dynamic plain model; peak = RSS above the RSS before the call)",
        "",
        "| context | hf-dynamic | hf-static | gated-dynamic | ours-M | ours / hf-dynamic | ours peak MiB | "
        "hf-dynamic peak MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['context']} | {_num(r.get('hf_dynamic_prefill_s'), '.2f')} | {_num(r.get('hf_static_prefill_s'), '.2f')} | "
            f"{_num(r.get('gated_dynamic_prefill_s'), '.2f')} | {r['ours_prefill_s']:.2f} | "
            f"{_ratio(r['ours_prefill_s'], r.get('hf_dynamic_prefill_s'))} | {r['ours_prefill_peak_bytes'] / MIB:.0f} | "
            f"{_num(r.get('hf_dynamic_prefill_peak_bytes', 0) / MIB if 'hf_dynamic_prefill_peak_bytes' in r else None, '.0f')} |"
        )
    lines += [
        "",
        f"Decode, CPU ms per token (fixed budget: mean of {result['decode_steps']} steps; budget >= length: "
        f"{result['full_steps']} steps)",
        "",
        "| context | ours-M | dense-M static | dense-M dynamic | ours-M / dense-M (faster) | ours-full | hf-dynamic | "
        "hf-static | ours-full / hf-dynamic | ours-full / hf-static | ours-M KV+views MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        dense = min(r["dense_static_decode_ms"], r["dense_dynamic_decode_ms"])
        lines.append(
            f"| {r['context']} | {r['ours_decode_ms']:.1f} | {r['dense_static_decode_ms']:.1f} | "
            f"{r['dense_dynamic_decode_ms']:.1f} | {_ratio(r['ours_decode_ms'], dense)} | "
            f"{_num(r.get('ours_full_decode_ms'), '.1f')} | "
            f"{_num(r.get('hf_dynamic_decode_ms'), '.1f')} | {_num(r.get('hf_static_decode_ms'), '.1f')} | "
            f"{_ratio(r.get('ours_full_decode_ms'), r.get('hf_dynamic_decode_ms'))} | "
            f"{_ratio(r.get('ours_full_decode_ms'), r.get('hf_static_decode_ms'))} | "
            f"{(r['ours_kv_bytes'] + r['ours_views_bytes']) / MIB:.0f} |"
        )
    lines += [
        "",
        "Native-path decode at the fixed budget (`model(..., cache=...)` step by step), per round (each "
        f"{result['decode_steps']} steps, interleaved): ours-M over the gated model on a dense cache of M entries "
        "(faster of static / dynamic: the cache's own cost) and over the plain model on a `DynamicCache` of M "
        "entries (plain dense: the cache's and the gates' cost); median (min-max) over the rounds",
        "",
        "| context | rounds | ours-M ms | dense-M gated ms | dense-M plain ms | ours / dense-M gated | "
        "ours / dense-M plain | gates' share (gated / plain dense) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rounds = r.get("decode_rounds") or []
        if not rounds or "dense_plain" not in rounds[0]:
            continue
        def spread(values):
            return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"
        gated = [min(x["dense_static"], x["dense_dynamic"]) for x in rounds]
        lines.append(
            f"| {r['context']} | {len(rounds)} | {r['ours_decode_ms']:.1f} | {statistics.fmean(gated):.1f} | "
            f"{r['dense_plain_decode_ms']:.1f} | {spread([x['ours'] / g for x, g in zip(rounds, gated)])} | "
            f"{spread([x['ours'] / x['dense_plain'] for x in rounds])} | "
            f"{spread([g / x['dense_plain'] for x, g in zip(rounds, gated)])} |"
        )
    policies = result.get("policies", [])
    if policies:
        lines += [
            "",
            f"Decode at the same budget under the baseline policies that read attention statistics, CPU ms per "
            f"token (same {result['decode_steps']} steps, interleaved with ours-M, whose policy is `global`)",
            "",
            "| context | ours-M (global) | " + " | ".join(f"{p}-M" for p in policies) + " | "
            + " | ".join(f"{p} / global" for p in policies) + " |",
            "|---:|---:|" + "---:|" * (2 * len(policies)),
        ]
        for r in rows:
            lines.append(
                f"| {r['context']} | {r['ours_decode_ms']:.1f} | "
                + " | ".join(_num(r.get(f"{p}_decode_ms"), ".1f") for p in policies) + " | "
                + " | ".join(_ratio(r.get(f"{p}_decode_ms"), r["ours_decode_ms"]) for p in policies) + " |"
            )
    lines += [
        "",
        f"KV bound (budget + L*H*max(buffer, chunk) entries): {result['bound_bytes'] / MIB:.0f} MiB; "
        f"model {result['gated_model_bytes'] / MIB:.0f} MiB; one eviction: {result['eviction_ms']:.1f} ms",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
