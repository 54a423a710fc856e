"""Every eviction policy at the same KV memory on the offline lmms-eval task `dbtrimkv_recall`, with the
cost beside the score.

Why: the lmms-eval `dbtrimkv` model must report what `dbtrimkv eval synthetic` reports on the same
prompts, and a KV method's score must come with what it cost. This script exports the synthetic
recall prompts (`dbtrimkv eval export-lmms`), runs the plain `lmms-eval` command on them once per
policy at one memory size (and once with the full cache), reads the results and per-sample records
it writes (accuracy and the `token_counts.kv` cost the model logs), and answers every prompt again
through the synthetic benchmark's own `answer` under the same settings to show the answers agree.
Writes JSON and a markdown table.

    python bench/lmms_recall.py --examples 20 --memory-size 16 --output bench/results/lmms_recall

Needs the `[lmms]` extra (`pip install -e ".[lmms]"`, in a venv of its own: it pins av<16) and a
torchvision that imports beside its torch (README, "Evaluating with lmms-eval"); `--via-module` runs
`python -m dbtrimkv.lmms` instead of `lmms-eval` where it does not.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

import dbtrimkv  # noqa: F401  (before lmms-eval: makes torchvision importable on a CPU-only torch)
from dbtrimkv.loading.checkpoints import gates_are_trained, load_model
from dbtrimkv.eval.harness import BenchmarkSpec, answer
from dbtrimkv.lmms import recall_export
from dbtrimkv.lmms.cost import task_summary
from dbtrimkv.lmms.settings import parse_model_args
from dbtrimkv.inputs.prompts import tokenizer_of
from dbtrimkv.recall.tasks import TASK_KINDS, prompt_inputs
from lmms_eval.utils import simple_parse_args_string

POLICIES = ["global", "layer", "head", "streaming", "snapkv", "h2o", "knorm", "random"]  # every policy but threshold (its tau sets the memory)
SYNTHETIC_TASKS = {  # `dbtrimkv eval synthetic`'s default task flags, per kind
    "cards": dict(num_cards=8, filler=32, image_size=32, answer_modality="any", needle=None, distractors=1),
    "video": dict(frames=8, filler=32, image_size=32, needle=None),
    "image": dict(filler=32, image_size=32),
}
STREAMING = "prefill_chunk=32,buffer_size=0"  # eval synthetic's setting: 32-token chunks, eviction before each


def model_args(policy: str | None, memory_size: int, model: str) -> str:
    eviction = "full_cache=true" if policy is None else f"memory_size={memory_size},policy={policy}"
    return f"pretrained={model},{eviction},{STREAMING}"


def lmms_eval_command(args_string: str, directory, output, via_module: bool = False) -> list[str]:
    """The command a user types: `lmms-eval` (or `python -m dbtrimkv.lmms`) on the exported task."""
    launcher = ([sys.executable, "-m", "dbtrimkv.lmms"] if via_module
                else [shutil.which("lmms-eval", path=str(Path(sys.executable).parent)) or "lmms-eval"])
    return [*launcher, "--model", "dbtrimkv", "--model_args", args_string, "--tasks", recall_export.TASK_NAME,
            "--include_path", str(directory), "--log_samples", "--output_path", str(output)]


def run_lmms_eval(command: list[str], output: Path) -> tuple[dict, list[dict]]:
    """Run the command; (the results JSON it wrote, its logged samples)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"lmms-eval failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    (results,) = glob.glob(str(output / "*" / "*_results.json"))
    (samples,) = glob.glob(str(output / "*" / f"*_samples_{recall_export.TASK_NAME}.jsonl"))
    return json.loads(Path(results).read_text()), [json.loads(line) for line in Path(samples).read_text().splitlines()]


def run_policy(args_string: str, directory: Path, output: Path, prompts: dict, docs: list[dict], model, processor,
               via_module: bool = False) -> dict:
    """One lmms-eval run of the task, its cost summary, and the synthetic benchmark's answers (same settings)."""
    start = time.perf_counter()
    results, samples = run_lmms_eval(lmms_eval_command(args_string, directory, output, via_module), output)
    seconds = time.perf_counter() - start
    samples = sorted(samples, key=lambda s: s["doc_id"])
    config = parse_model_args(**simple_parse_args_string(args_string)).resolve(model)  # as lmms-eval parses them
    agree, by_kind = 0, {}
    for sample in samples:
        doc = docs[sample["doc_id"]]
        expected, _ = answer(model, processor, prompt_inputs(processor, [prompts[doc["kind"]][doc["seed"]]]), config)
        agree += _response(sample) == without_special_tokens(processor, expected)
        by_kind.setdefault(doc["kind"], []).append(sample["accuracy"])
    records = [s["token_counts"][0]["kv"] for s in samples]
    return {
        "model_args": args_string, "config": config.to_dict(), "seconds": round(seconds, 1),
        "accuracy": results["results"][recall_export.TASK_NAME]["accuracy,none"],
        "by_kind": {kind: sum(v) / len(v) for kind, v in by_kind.items()},
        "same_answers_as_eval_synthetic": agree, "samples": len(samples), "cost": task_summary(records),
        "responses": [_response(s) for s in samples],  # in the order of `docs`
    }


def _response(sample: dict) -> str:
    """The model's answer in a logged sample (a list of one in memory)."""
    response = sample["filtered_resps"]
    return response[0] if isinstance(response, list) else response


def without_special_tokens(processor, text: str) -> str:
    """The harness decodes its token as is (`<|im_end|>`), the pipeline without special tokens (``)."""
    tokenizer = tokenizer_of(processor)
    return tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids, skip_special_tokens=True)


def _kib(n: float) -> str:
    return f"{n / 1024:.1f}"


def markdown(data: dict) -> str:
    kinds = list(data["kinds"])
    head = ("| policy | accuracy | " + " | ".join(kinds) + " | same answers as eval synthetic | peak KV KiB mean | "
            "peak KV KiB max | full-cache KiB mean | full-cache KiB max | peak / full | prefill s / sample | "
            "decode s / sample | tokens/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in data["rows"]:
        cost = row["cost"]
        lines.append(
            f"| {row['policy']} | {100 * row['accuracy']:.0f} | "
            + " | ".join(f"{100 * row['by_kind'][k]:.0f}" for k in kinds)
            + f" | {row['same_answers_as_eval_synthetic']}/{row['samples']} | {_kib(cost['peak_kv_bytes_mean'])} | "
            f"{_kib(cost['peak_kv_bytes_max'])} | {_kib(cost['kv_bytes_full_mean'])} | "
            f"{_kib(cost['kv_bytes_full_max'])} | "
            f"{100 * cost['kv_fraction_mean']:.0f}% | {cost['prefill_seconds'] / cost['samples']:.3f} | "
            f"{cost['decode_seconds'] / cost['samples']:.3f} | {cost['tokens_per_second']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=20, help="prompts per kind (seeds 0..N-1; default 20)")
    parser.add_argument("--memory-size", type=int, default=16, help="entries per (layer, KV head) for every policy")
    parser.add_argument("--policies", nargs="+", default=POLICIES)
    parser.add_argument("--model", default="tiny-recall")
    parser.add_argument("--output", default="bench/results/lmms_recall", help="writes OUTPUT.json and OUTPUT.md")
    parser.add_argument("--via-module", action="store_true",
                        help="run `python -m dbtrimkv.lmms`, not `lmms-eval` (a CPU torch beside PyPI's torchvision)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    prompts = {kind: BenchmarkSpec(kind=kind, task=SYNTHETIC_TASKS[kind], examples=args.examples).prompts()
               for kind in TASK_KINDS}
    model, processor = load_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "task"
        recall_export.export_task(directory, prompts)
        docs = [json.loads(line) for line in (directory / recall_export.DATA_FILE).read_text().splitlines()]
        for i, policy in enumerate([None, *args.policies]):
            row = run_policy(model_args(policy, args.memory_size, args.model), directory, Path(tmp) / f"run{i}",
                             prompts, docs, model, processor, args.via_module)
            rows.append(dict(row, policy="full cache" if policy is None else policy))
            print(f"{rows[-1]['policy']}: accuracy {row['accuracy']:.3f}, {row['seconds']} s", file=sys.stderr)
    command = "python bench/lmms_recall.py " + " ".join(sys.argv[1:] if argv is None else argv)
    launcher = "python -m dbtrimkv.lmms" if args.via_module else "lmms-eval"
    data = {"command": command, "launcher": launcher, "model": args.model, "gates_trained": gates_are_trained(model),
            "versions": {name: version(name) for name in ("lmms_eval", "transformers", "torch")},
            "kinds": list(TASK_KINDS), "examples_per_kind": args.examples,
            "memory_size": args.memory_size, "synthetic_task": SYNTHETIC_TASKS,
            "docs": [{"id": d["id"], "answer": d["answer"]} for d in docs], "rows": rows}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    versions = ", ".join(f"{name} {v}" for name, v in data["versions"].items())
    output.with_suffix(".md").write_text(
        f"# dbtrimkv_recall through lmms-eval: every policy at memory_size={args.memory_size}\n\n"
        f"Command: `{command}` ({versions}; model {data['model']}).\n\n"
        f"{args.examples} prompts of each kind (cards, video clips, single images: `dbtrimkv eval synthetic`'s "
        f"default task flags, seeds 0..{args.examples - 1}), one new token, streamed in 32-token prefill chunks "
        f"with eviction before each (`{STREAMING}`). Accuracy (%) is lmms-eval's; \"same answers\" counts the "
        f"prompts where the synthetic benchmark's `answer` under the same settings gave the same token. KV columns "
        f"are per sample (the engine's GenerationStats, logged by lmms-eval in `token_counts.kv`): peak bytes held, "
        f"and what a full cache holds for the same prompt. Each row is the command\n"
        f"`{launcher} --model dbtrimkv --model_args {model_args('POLICY', args.memory_size, args.model)} "
        f"--tasks dbtrimkv_recall --include_path DIR --log_samples --output_path OUT` "
        f"(DIR from `dbtrimkv eval export-lmms DIR --examples {args.examples}`; the full-cache row: "
        f"`{model_args(None, args.memory_size, args.model)}`). Times are CPU seconds per sample on a shared 2-core "
        f"machine (noisy); with one new token, tokens/s is the first decode step's rate.\n\n{markdown(data)}\n")
    print(output.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
