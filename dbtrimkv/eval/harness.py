"""Run eviction policies on held-out synthetic recall prompts, all in the same engine.

Why: a comparison of policies is only fair with the same model, the same budget accounting and
the same storage. Every (policy, budget) answers every prompt through `dbtrimkv.generate` with a
fresh `DBTrimKVCache`: chunked prefill with eviction before each chunk, then one greedy token.
The budget is a fraction of the prompt's full cache (prompt tokens x layers x KV heads entries),
converted to an entry budget per prompt, so prompts of different lengths are compressed alike.
The answer is right when the generated token is the gold digit.

Setting (question-agnostic streaming compression): the prompt streams in `prefill_chunk`-token
chunks and the cache is cut to the budget before each chunk, so no policy knows the question
while the cards go by. The last chunk (it holds the question) is always fully visible to the
answer, on top of the budget, for every policy alike.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from ..loading import checkpoints
from ..cache import DBTrimKVCache
from ..loading.checkpoints import describe, gates_are_trained
from ..settings.config import DBTrimKVConfig
from ..cache import calibration
from ..generation import generate
from ..loading.models import DEFAULT_MODEL
from ..modeling.model_anatomy import text_config_of
from ..inputs.prompts import tokenizer_of
from ..recall.tasks import (
    TASK_KINDS, ImageRecallTask, RecallExample, RecallTask, VideoRecallTask, examples, prompt_inputs,
)

logger = logging.getLogger(__name__)

FULL = "full"


@dataclass
class BenchmarkSpec:
    """What to run: the prompts (kind, task parameters, count) and the policy x budget grid."""
    kind: str = "cards"
    task: dict = field(default_factory=dict)
    examples: int = 100
    policies: list[str] = field(default_factory=lambda: ["global", "streaming"])
    budgets: list[float] = field(default_factory=lambda: [0.05, 0.25])
    prefill_chunk: int = 32
    buffer_size: int = 0
    threshold: float | None = None  # tau of the threshold policy, with each budget as its hard cap
    calibration: dict = field(default_factory=dict)  # DBTrimKVConfig video_decay_scale / decay_floor of the bounded runs

    def make_task(self) -> RecallTask | VideoRecallTask | ImageRecallTask:
        return TASK_KINDS[self.kind](**self.task)

    def prompts(self) -> list[RecallExample]:
        """Held-out prompts: seeds 0 .. examples - 1 (training seeds start at TRAIN_SEED_BASE)."""
        return examples(self.kind, range(self.examples), self.make_task())

    @classmethod
    def from_args(cls, args) -> "BenchmarkSpec":
        if args.kind == "cards":
            task = dict(num_cards=args.num_cards, filler=args.filler, image_size=args.image_size,
                        answer_modality=args.answer_modality, needle=args.needle, distractors=args.distractors)
        elif args.kind == "video":
            task = dict(frames=args.frames, filler=args.filler, image_size=args.image_size, needle=args.needle)
        else:
            task = dict(filler=args.filler, image_size=args.image_size)
        return cls(kind=args.kind, task=task, examples=args.examples, policies=list(args.policies),
                   budgets=list(args.budgets), prefill_chunk=args.prefill_chunk, buffer_size=args.buffer_size,
                   threshold=args.threshold,  # export-lmms has no calibration flags: none there
                   calibration=calibration.settings_from(args))


def entry_budget(fraction: float, prompt_tokens: int, segments: int) -> int:
    """Entries a sequence may keep: `fraction` of the prompt's full cache, at least one per (layer, head)."""
    return max(segments, round(fraction * prompt_tokens * segments))


def answer(model, processor, inputs, config: DBTrimKVConfig) -> tuple[str, int]:
    """Greedy one-token answer under `config`; returns (decoded token, peak entries held)."""
    cache = DBTrimKVCache(model, config)
    new = generate(model, inputs, cache, max_new_tokens=1, do_sample=False)
    return tokenizer_of(processor).decode(new[0]), max(cache.peak_entries)


def _summary(name: str, budget: float | None, rows: list[dict], key: str) -> dict:
    correct = [row[key] == row["answer"] for row in rows]
    by_modality = {}
    for modality in sorted({row["modality"] for row in rows}):
        picked = [c for c, row in zip(correct, rows) if row["modality"] == modality]
        by_modality[modality] = sum(picked) / len(picked)
    return {"policy": name, "budget": budget, "accuracy": sum(correct) / max(len(rows), 1), "correct": sum(correct),
            "examples": len(rows), "by_modality": by_modality}


@torch.no_grad()
def run_benchmark(spec: BenchmarkSpec, model_name=None, device="cpu", dtype=None) -> dict:
    """Answer every prompt with a full cache and under every (policy, budget); returns the results dict."""
    model_name = str(model_name or DEFAULT_MODEL)  # the shipped tiny-recall model
    model, processor = checkpoints.load_model(model_name, device=device, dtype=dtype)
    if not gates_are_trained(model):
        logger.warning("%s has untrained retention gates: the learned policies rank by recency only", model_name)
    text = text_config_of(model)
    segments = text.num_hidden_layers * text.num_key_value_heads
    base = dict(prefill_chunk=spec.prefill_chunk, buffer_size=spec.buffer_size)
    rows, start = [], time.perf_counter()
    for example in spec.prompts():
        inputs = prompt_inputs(processor, [example])
        tokens = int(inputs["input_ids"].shape[1])
        row = {"seed": example.seed, "answer": example.answer, "modality": example.answer_modality,
               "prompt_tokens": tokens}
        row[FULL], _ = answer(model, processor, inputs, DBTrimKVConfig(**base))
        for policy in spec.policies:
            for fraction in spec.budgets:
                budget = entry_budget(fraction, tokens, segments)
                tau = spec.threshold if policy == "threshold" else None
                config = DBTrimKVConfig(budget=budget, policy=policy, threshold=tau, **base, **spec.calibration)
                predicted, peak = answer(model, processor, inputs, config)
                bound = budget + segments * max(spec.buffer_size, spec.prefill_chunk)
                if peak > bound:
                    raise RuntimeError(f"{policy} held {peak} entries, above the bound {bound}")
                row[f"{policy}@{fraction}"] = predicted
        rows.append(row)
        logger.info("example %d/%d (%d tokens) %.0fs", len(rows), spec.examples, tokens, time.perf_counter() - start)
    results = [_summary(FULL, None, rows, FULL)]
    results += [_summary(p, f, rows, f"{p}@{f}") for p in spec.policies for f in spec.budgets]
    tokens = [row["prompt_tokens"] for row in rows]
    return {
        "model": describe(model), "gates_trained": gates_are_trained(model), "spec": asdict(spec),
        "layers_x_kv_heads": segments, "seconds": round(time.perf_counter() - start, 1),
        "prompt_tokens": {"mean": statistics.fmean(tokens), "min": min(tokens), "max": max(tokens)},
        "results": results, "examples": rows,
    }
