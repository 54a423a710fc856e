"""Gate-training benchmark: step time and peak memory, FlexAttention vs the plain path.

Model: Qwen3-VL with the text shape of Qwen3-VL-4B (36 layers, hidden 2560, 32 query / 8 KV heads,
head_dim 128, vocab 151,936; small vision tower, unused), random weights from the config, bf16,
rg10 gates (float32), gradient checkpointing on. One training step = teacher forward (no grad) +
student forward + backward + AdamW step on the gates, batch 1, half of the tokens are response
tokens (the KL / next-token positions), global capacity loss with M = 512. Lengths 4k and 16k.
The plain path materialises `[heads, T, T]` float32 logits per layer, so at 16k it is expected to
run out of memory; that is recorded as `OOM`.

Without CUDA only `--quick` runs: a 2-layer, hidden-512 model of the same head shape, 256 and 1024
tokens, plain path, float32. Those numbers only show that the script and the training step work;
the 4k / 16k flex-vs-plain comparison needs a GPU.

    python bench/bench_training.py --out bench/results/training_gpu.json          # GPU
    python bench/bench_training.py --quick --out bench/results/training_cpu.json  # CPU smoke run

Writes the rows and the environment as JSON to `--out` and a markdown table beside it (`.md`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import dbtrimkv  # first: on CPU-only torch it makes torchvision (and so transformers' models) importable
from transformers import AutoModelForImageTextToText, Qwen3VLConfig  # noqa: E402

from dbtrimkv.training.model import prepare_for_gate_training, unique_gate_parameters  # noqa: E402
from dbtrimkv.training.objective import GateDistiller  # noqa: E402

FULL = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, vocab_size=151936, gate_intermediate=512)
QUICK = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, head_dim=128, vocab_size=8192, gate_intermediate=128)


def build_model(shape: dict, dtype, device):
    text = {k: v for k, v in shape.items() if k != "gate_intermediate"}
    config = Qwen3VLConfig(
        text_config=dict(text, max_position_embeddings=1 << 16,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2,
                           out_hidden_size=shape["hidden_size"], deepstack_visual_indexes=[]),
    )
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype).to(device)
    dbtrimkv.attach_retention_gates(model, intermediate_size=shape["gate_intermediate"])
    return model


def random_batch(length: int, vocab: int, device) -> dict:
    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(0, vocab, (1, length), generator=gen)
    loss_mask = torch.zeros(1, length, dtype=torch.bool)
    loss_mask[:, length // 2:-1] = True
    batch = {"model_inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "loss_mask": loss_mask,
             "targets": torch.roll(ids, -1, dims=1), "positions": torch.arange(length)[None],
             "valid": torch.ones(1, length, dtype=torch.bool)}
    return {k: ({n: t.to(device) for n, t in v.items()} if isinstance(v, dict) else v.to(device))
            for k, v in batch.items()}


class PeakMemory:
    """Peak bytes during a block: CUDA allocator peak, or the process's peak RSS (VmHWM) on CPU."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            status = Path("/proc/self/status").read_text()
            self.bytes = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024


def time_steps(model, length: int, vocab: int, steps: int, device) -> tuple[float, int]:
    distiller = GateDistiller(model, memory_size=512, capacity_mode="global")
    optimizer = torch.optim.AdamW(unique_gate_parameters(model), lr=1e-4)
    batch = random_batch(length, vocab, device)

    def step():
        out = distiller(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (FlexAttention compiles here)
    times = []
    with PeakMemory(device) as peak:
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times), peak.bytes


def run(shape: dict, lengths, backends, steps: int, dtype, device) -> list[dict]:
    rows = []
    for backend in backends:
        model = build_model(shape, dtype, device)
        prepare_for_gate_training(model, backend, gradient_checkpointing=True)
        for length in lengths:
            row = {"backend": backend, "tokens": length, "step_s": None, "peak_GiB": None, "status": "ok"}
            try:
                seconds, peak = time_steps(model, length, shape["vocab_size"], steps, device)
                row.update(step_s=round(seconds, 4), peak_GiB=round(peak / 2**30, 3))
            except torch.OutOfMemoryError:
                row["status"] = "OOM"
            rows.append(row)
            print(row, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del model
    return rows


def markdown(rows: list[dict]) -> str:
    columns = ["backend", "tokens", "step_s", "peak_GiB", "status"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("-" if r[c] is None else str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; the only mode that runs without CUDA")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (median reported)")
    parser.add_argument("--out", default=None, help="JSON output path (a .md table is written beside it)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("No CUDA device: the 4k/16k flex-vs-plain numbers need a GPU. "
              "Run with --quick for the small CPU smoke run (plain path only).", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    if args.quick:
        shape, lengths, dtype = QUICK, (256, 1024), torch.bfloat16 if cuda else torch.float32
    else:
        shape, lengths, dtype = FULL, (4096, 16384), torch.bfloat16
    backends = ("flex", "plain") if cuda else ("plain",)
    note = ("GPU run" if cuda else
            "CPU --quick run: plain path only, small model; GPU numbers (4k/16k, flex vs plain) need a GPU")
    print(note, flush=True)
    rows = run(shape, lengths, backends, args.steps, dtype, device)
    table = markdown(rows)
    print(table)
    if args.out:
        env = {"device": device.type, "gpu": torch.cuda.get_device_name() if cuda else None,
               "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads()}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"note": note, "environment": env, "shape": shape, "dtype": str(dtype),
                                   "gradient_checkpointing": True, "rows": rows}, indent=2) + "\n")
        out.with_suffix(".md").write_text(f"{note}\n\n{table}\n")
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
