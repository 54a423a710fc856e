"""Write a benchmark's rows as JSON and print them as a markdown table."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def environment(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"device": device.type, "gpu": gpu, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def publish(title: str, rows: list[dict], columns: list[str], device: torch.device, out: str | None, notes=()) -> None:
    env = environment(device)
    print(f"### {title}\n")
    if env["gpu"] is None:
        print("**No GPU available: CPU run of the torch paths only (Triton rows need CUDA).**\n")
    else:
        print(f"GPU: {env['gpu']}\n")
    for note in notes:
        print(f"- {note}")
    if notes:
        print()
    print(markdown_table(rows, columns))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"title": title, "environment": env, "notes": list(notes), "rows": rows},
                                        indent=2))
        print(f"\nwrote {out}")
