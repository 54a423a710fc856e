"""Engine at real scale on a GPU: a Qwen3-VL-8B-shaped bf16 model (random weights, all 36 layers),
32k tokens of context, batch 1 and 4, ours at M=128 vs transformers' full cache (DynamicCache + sdpa).

Per batch size, one process, one model (ratios compare like with like):
- `hf full`: `model.generate` with a DynamicCache, before the gates are attached;
- `ours M=128`: `dbtrimkv.generate` (chunked prefill with eviction, then decode) with the gates;
- `ours M=128, constant gates`: the same with every gate replaced by a constant output, so the
  difference in decode time is the gates' share.
Reported: decode tokens/s (batch x steps / time between the first and last decoded token), KV bytes
(DynamicCache tensors vs our allocated slot pool), the share of decode time spent in eviction
(`DBTrimKVCache.evict`, timed with device synchronisation around it; one eviction per `buffer_size`
decoded tokens), and the gates' share. Targets (issue 16): decode >= 2.5x hf full at 32k batch 4,
eviction <= 2% and gates <= 3% of decode time.

`--dry-run`: the same code path at tiny sizes on CPU (1 layer at 8B width, small vocabulary,
256 tokens, batch 1 and 2, 10 decode steps, buffer 4), to check the script, not to measure.

    python bench/bench_engine_gpu.py --out bench/results/gpu/engine_gpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import dbtrimkv
from dbtrimkv.loading import shapes
from dbtrimkv.modeling.transformers_compat import cache_kwargs


class StepClock:
    """A stopping criterion that records when each decoded token came out (synchronising first)."""

    def __init__(self, device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_rate(clock: StepClock, batch: int) -> tuple[float, float]:
    """(decode tokens/s over the batch, decode window seconds)."""
    window = clock.stamps[-1] - clock.stamps[0]
    return batch * (len(clock.stamps) - 1) / window, window


def prompt(batch: int, context: int, vocab: int, device) -> dict:
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(300, vocab, (batch, context), generator=gen).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def run_hf(model, inputs, steps: int, device) -> dict:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    clock = StepClock(device)
    model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                   stopping_criteria=[clock])
    rate, window = decode_rate(clock, inputs["input_ids"].shape[0])
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    del cache
    return {"cache": "hf full", "decode_tok_s": rate, "decode_s": window, "kv_bytes": kv}


@torch.no_grad()
def run_ours(model, inputs, steps: int, memory_size: int, buffer: int, chunk: int, device, label: str) -> dict:
    config = dbtrimkv.DBTrimKVConfig(memory_size=memory_size, buffer_size=buffer, prefill_chunk=chunk)
    cache = dbtrimkv.DBTrimKVCache(model, config)
    clock = StepClock(device)
    spent = {"evict_s": 0.0, "evictions": 0}
    evict = cache.evict

    def timed_evict(*args, **kwargs):  # eviction time, counted only inside the decode window
        sync(device)
        start = time.perf_counter()
        out = evict(*args, **kwargs)
        sync(device)
        if clock.stamps:
            spent["evict_s"] += time.perf_counter() - start
            spent["evictions"] += 1
        return out

    cache.evict = timed_evict
    dbtrimkv.generate(model, inputs, cache, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                      stopping_criteria=[clock])
    rate, window = decode_rate(clock, inputs["input_ids"].shape[0])
    row = {"cache": label, "decode_tok_s": rate, "decode_s": window, "kv_bytes": cache.storage_bytes(),
           "evictions_in_decode": spent["evictions"], "eviction_share": spent["evict_s"] / window}
    del cache
    return row


class ConstantGate(torch.nn.Module):
    """Stands in for a retention gate: a constant log beta, almost no work."""

    def __init__(self, num_kv_heads: int):
        super().__init__()
        self.num_kv_heads = num_kv_heads

    def forward(self, hidden_states):
        return torch.full((*hidden_states.shape[:-1], self.num_kv_heads), -0.01, dtype=torch.float32,
                          device=hidden_states.device)


def swap_gates(model, gates):
    from dbtrimkv.modeling.gates import text_attention_modules

    old = []
    for module, gate in zip(text_attention_modules(model), gates):
        old.append(module.retention_gate)
        module.retention_gate = gate
    return old


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: checks the script only")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--memory-size", type=int, default=128)
    parser.add_argument("--buffer-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=129, help="decoded tokens (eviction every buffer_size)")
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu/engine_gpu.json"))
    args = parser.parse_args()
    if args.dry_run:
        device, layers, vocab = torch.device("cpu"), 1, 1024
        args.context, args.batches, args.steps, args.chunk, args.buffer_size = 256, [1, 2], 10, 64, 4
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_engine_gpu.py needs CUDA (use --dry-run to check it on CPU)")
        device, layers, vocab = torch.device("cuda"), None, None
    shape = "qwen3-vl-8b"
    with torch.device(device):
        model, _ = shapes.build_model(shape, num_layers=layers, vision_depth=1, vocab_size=vocab,
                                      dtype=torch.bfloat16)
    model.to(device)
    text = model.config.get_text_config()
    rows = []
    for batch in args.batches:
        inputs = prompt(batch, args.context, text.vocab_size, device)
        rows.append({"batch": batch, **run_hf(model, inputs, args.steps, device)})
        print(rows[-1], flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dbtrimkv.attach_retention_gates(model)
    for batch in args.batches:
        inputs = prompt(batch, args.context, text.vocab_size, device)
        ours = run_ours(model, inputs, args.steps, args.memory_size, args.buffer_size, args.chunk, device,
                        f"ours M={args.memory_size}")
        trained = swap_gates(model, [ConstantGate(text.num_key_value_heads) for _ in range(text.num_hidden_layers)])
        constant = run_ours(model, inputs, args.steps, args.memory_size, args.buffer_size, args.chunk, device,
                            f"ours M={args.memory_size}, constant gates")
        swap_gates(model, trained)
        hf = next(r for r in rows if r["batch"] == batch and r["cache"] == "hf full")
        ours.update(vs_hf_decode=ours["decode_tok_s"] / hf["decode_tok_s"], kv_vs_hf=ours["kv_bytes"] / hf["kv_bytes"],
                    gate_share=max(0.0, 1 - ours["decode_tok_s"] / constant["decode_tok_s"]))
        rows += [{"batch": batch, **ours}, {"batch": batch, **constant}]
        print(rows[-2], rows[-1], sep="\n", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report = {"shape": shape, "layers": text.num_hidden_layers, "dtype": "bfloat16", "context": args.context,
              "memory_size": args.memory_size, "buffer_size": args.buffer_size, "steps": args.steps,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dry_run": args.dry_run, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
