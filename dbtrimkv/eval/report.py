"""Write a benchmark's results as JSON, a markdown table and a plot (accuracy vs budget per policy).

Why: the numbers must be committed in a form people read (the table), tools read (the JSON) and
that shows the trend at a glance (the plot); all three come from the same results dict.
"""

from __future__ import annotations

import json
from pathlib import Path

from .harness import FULL
from .plot_styles import distinct_styles
from ..recall.tasks import DIGITS


def _pct(value: float) -> str:
    return f"{100 * value:.0f}"


def _policies(results: dict) -> list[str]:
    return list(dict.fromkeys(r["policy"] for r in results["results"] if r["policy"] != FULL))


def _budgets(results: dict) -> list[float]:
    return sorted({r["budget"] for r in results["results"] if r["budget"] is not None})


def _cell(results: dict, policy: str, budget: float | None) -> dict:
    return next(r for r in results["results"] if r["policy"] == policy and r["budget"] == budget)


def markdown_table(results: dict) -> str:
    """Accuracy (%) per policy (rows) and budget fraction (columns), with the full cache on top."""
    budgets = _budgets(results)
    full = _cell(results, FULL, None)
    head = "| policy | " + " | ".join(f"{b:g}" for b in budgets) + " |"
    lines = [head, "|" + "---|" * (len(budgets) + 1),
             "| full cache | " + " | ".join(_pct(full["accuracy"]) for _ in budgets) + " |"]
    for policy in _policies(results):
        lines.append(f"| {policy} | " + " | ".join(_pct(_cell(results, policy, b)["accuracy"]) for b in budgets) + " |")
    return "\n".join(lines)


def modality_table(results: dict) -> str:
    """Accuracy (%) split by where the answer sits (image / text / video), per policy and budget."""
    budgets = _budgets(results)
    modalities = sorted(_cell(results, FULL, None)["by_modality"])
    lines = ["| policy | answer in | " + " | ".join(f"{b:g}" for b in budgets) + " |",
             "|" + "---|" * (len(budgets) + 2)]
    for policy in _policies(results):
        for modality in modalities:
            cells = [_pct(_cell(results, policy, b)["by_modality"].get(modality, 0.0)) for b in budgets]
            lines.append(f"| {policy} | {modality} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(results: dict):
    """Accuracy vs budget fraction (log scale), one line per policy, full cache and chance as references;
    lines with equal values get distinct styles (`plot_styles`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = _budgets(results)
    full = 100 * _cell(results, FULL, None)["accuracy"]
    series = {"full cache": [full] * len(budgets)}
    series.update({policy: [100 * _cell(results, policy, b)["accuracy"] for b in budgets]
                   for policy in _policies(results)})
    styles = distinct_styles(series)
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    ax.axhline(full, color="black", linestyle="--", label="full cache", zorder=1)
    for policy in _policies(results):
        ax.plot(budgets, series[policy], label=policy, **styles[policy])
    ax.axhline(100 / len(DIGITS), color="gray", linestyle=":", label="chance", zorder=1)
    ax.set_xscale("log")
    ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("KV budget (fraction of the full cache)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 102)
    ax.set_title(f"synthetic recall ({results['spec']['kind']}, {results['spec']['examples']} prompts)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def plot(results: dict, path: Path) -> None:
    """`figure(results)` written to `path` (PNG)."""
    import matplotlib.pyplot as plt

    fig = figure(results)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_paths(prefix: str | Path, results: dict, command: str) -> tuple[Path, Path, Path]:
    """(`prefix`.json, .md, .png), with the folder made and the results (and command) written as JSON."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (prefix.with_suffix(s) for s in (".json", ".md", ".png"))
    json_path.write_text(json.dumps(dict(results, command=command), indent=1) + "\n")
    return json_path, md_path, png_path


def write_report(results: dict, prefix: str | Path, command: str) -> list[Path]:
    """`prefix`.json, `prefix`.md and `prefix`.png; returns the three paths."""
    json_path, md_path, png_path = report_paths(prefix, results, command)
    tokens = results["prompt_tokens"]
    spec = results["spec"]
    md_path.write_text(
        f"# Synthetic recall: accuracy (%) vs KV budget\n\n"
        f"Command: `{command}`\n\n"
        f"Model: {results['model']} (gates trained: {results['gates_trained']}). {spec['examples']} held-out "
        f"{spec['kind']} prompts (task {spec['task']}), {tokens['mean']:.0f} tokens on average "
        f"({tokens['min']}-{tokens['max']}); budget = fraction x prompt tokens x {results['layers_x_kv_heads']} "
        f"(layers x KV heads) entries; prefill chunk {spec['prefill_chunk']}, buffer {spec['buffer_size']}. "
        f"Chance: {100 / len(DIGITS):.0f}%. Wall time {results['seconds']:.0f} s.\n\n"
        f"{markdown_table(results)}\n\nBy the modality that holds the answer:\n\n{modality_table(results)}\n\n"
        f"![accuracy vs budget]({png_path.name})\n"
    )
    plot(results, png_path)
    return [json_path, md_path, png_path]
