"""Write the long-video benchmark as JSON, markdown tables and one PNG with two plots.

Why: the claim of a fixed KV budget on long video is two curves side by side, accuracy and
memory against video length, with the full cache ending where it runs out of memory; the
tables carry the same numbers (and the time per minute of video) for reading and diffing.
"""

from __future__ import annotations

from pathlib import Path

from ..recall.tasks import DIGIT_HOLD, DIGITS
from .long_video import FULL, OOM
from .plot_styles import distinct_styles
from .report import report_paths


def _policies(results: dict) -> list[str]:
    return list(dict.fromkeys(c["policy"] for c in results["results"]))


def _lengths(results: dict) -> list[float]:
    return sorted({c["minutes"] for c in results["results"]})


def _cell(results: dict, minutes: float, policy: str) -> dict | None:
    return next((c for c in results["results"] if c["minutes"] == minutes and c["policy"] == policy), None)


def _label(policy: str) -> str:
    return "full cache" if policy == FULL else policy


def _table(results: dict, value) -> str:
    policies = _policies(results)
    lines = ["| minutes | " + " | ".join(_label(p) for p in policies) + " |", "|" + "---|" * (len(policies) + 1)]
    for minutes in _lengths(results):
        cells = []
        for policy in policies:
            cell = _cell(results, minutes, policy)
            cells.append("-" if cell is None else "OOM" if cell["status"] == OOM else value(cell))
        lines.append(f"| {minutes:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def _accuracy(cell: dict) -> str:
    return f"{100 * cell['accuracy']:.0f}"


def _kv(cell: dict) -> str:
    return _mib(cell["kv_bytes"])


def _rss(cell: dict) -> str:
    return _mib(cell["rss_bytes"])


def _speed(cell: dict) -> str:
    cpu = cell.get("cpu_seconds_per_minute")
    return f"{cell['seconds_per_minute']:.2f}" + ("" if cpu is None else f" ({cpu:.2f})")


def _library(results: dict) -> str:
    """The transformers release the run used (files written before it was recorded have none)."""
    return f"; transformers {results['transformers']}" if results.get("transformers") else ""


def _seeds(spec: dict) -> str:
    """Which videos, where they are not the benchmark's own (seeds 0..N-1)."""
    first = spec.get("first_seed", 0)
    return f" (seeds {first}-{first + spec['examples'] - 1}, not the benchmark's 0-{spec['examples'] - 1})" if first else ""


def markdown(results: dict, command: str, png_name: str) -> str:
    spec = results["spec"]
    tokens = {c["minutes"]: c["prompt_tokens"] for c in results["results"] if "prompt_tokens" in c}
    token_line = ", ".join(f"{m:g} min: {t}" for m, t in sorted(tokens.items()))
    return (
        "# Long-video recall: accuracy and memory vs video length\n\n"
        f"Command: `{command}`\n\n"
        f"Model: {results['model']} (gates trained: {results['gates_trained']}{_library(results)}). Synthetic videos at {spec['fps']:g} fps ({results['frames_per_minute']} frames a "
        f"minute, {spec['image_size']} px), the digit on {DIGIT_HOLD} consecutive frames (a still image) at a random time, the question after the last frame; "
        f"{spec['examples']} videos per length{_seeds(spec)}, streamed through video-qa's windowed path ({spec['window_frames']} "
        f"frames per window) at memory size M = {spec['memory_size']} per (layer, KV head). The full cache runs until "
        f"its KV storage passes {spec['full_cache_cap_mb']:g} MiB (OOM). Chance: {100 / len(DIGITS):.0f}%.\n"
        f"Prompt tokens: {token_line}.\n\n"
        f"Accuracy (%):\n\n{_table(results, _accuracy)}\n\n"
        f"Peak KV storage (MiB, the slot pool; the pool never shrinks):\n\n"
        f"{_table(results, _kv)}\n\n"
        f"Peak resident memory of the process (MiB, sampled after every window):\n\n"
        f"{_table(results, _rss)}\n\n"
        f"Seconds per minute of video, wall clock (CPU time of the process in brackets; frame drawing, processor, "
        f"prefill and the answer):\n\n"
        f"{_table(results, _speed)}\n\n"
        f"![accuracy and memory vs video length]({png_name})\n"
    )


def figure(results: dict):
    """Left: accuracy vs length per policy; right: peak KV storage vs length (full cache to OOM). Lines with
    equal values get distinct styles (`plot_styles`); the full cache stays black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = _lengths(results)
    policies = sorted(_policies(results), key=lambda p: p != FULL)  # the full cache first, the others on top
    done = {p: [(m, c) for m in lengths if (c := _cell(results, m, p)) is not None and c["status"] == "ok"]
            for p in policies}
    accuracy = {p: {m: 100 * c["accuracy"] for m, c in done[p]} for p in policies}
    memory = {p: {m: c["kv_bytes"] / 2**20 for m, c in done[p]} for p in policies}
    fig, (acc, mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, values in ((acc, accuracy), (mem, memory)):
        styles = distinct_styles({p: [values[p].get(m) for m in lengths] for p in policies})
        for policy in policies:
            if values[policy]:
                style = dict(styles[policy], color="black") if policy == FULL else styles[policy]
                ax.plot(list(values[policy]), list(values[policy].values()), label=_label(policy), **style)
    for policy in policies:
        oom = [m for m in lengths if (c := _cell(results, m, policy)) is not None and c["status"] == OOM]
        if oom:
            mem.axvline(oom[0], color="red", linestyle=":", label=f"{_label(policy)}: OOM from {oom[0]:g} min")
    mem.axhline(results["spec"]["full_cache_cap_mb"], color="red", linewidth=0.8, label="memory cap")
    acc.axhline(100 / len(DIGITS), color="gray", linestyle=":", label="chance")
    for ax in (acc, mem):
        ax.set_xscale("log")
        ax.set_xticks(lengths, [f"{m:g}" for m in lengths])
        ax.minorticks_off()
        ax.set_xlabel("video length (minutes)")
    acc.set_ylim(0, 102)
    acc.set_ylabel("accuracy (%)")
    acc.set_title("accuracy vs video length")
    mem.set_yscale("log")
    mem.set_ylabel("peak KV storage (MiB)")
    mem.set_title(f"KV memory vs video length (M = {results['spec']['memory_size']})")
    acc.legend(fontsize=8)
    mem.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot(results: dict, path: Path) -> None:
    """`figure(results)` written to `path` (PNG)."""
    import matplotlib.pyplot as plt

    fig = figure(results)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, prefix: str | Path, command: str) -> list[Path]:
    """`prefix`.json, `prefix`.md and `prefix`.png; returns the three paths."""
    json_path, md_path, png_path = report_paths(prefix, results, command)
    md_path.write_text(markdown(results, command, png_path.name))
    plot(results, png_path)
    return [json_path, md_path, png_path]
