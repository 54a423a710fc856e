"""`dbtrimkv` as an lmms-eval chat model (`lmms-eval --model dbtrimkv --model_args ...`).

Why: researchers compare multimodal models and KV methods with lmms-eval. This class is the glue,
registered through lmms-eval's `lmms_eval.models` entry points (`registration.py`), and nothing
more: every request goes through `DBTrimKVPipeline`, the product's one generation path, and every
sample's answer comes back with what it cost (`cost.py`) in lmms-eval's per-sample
`token_counts` record (a `TokenCounts` subclass, so lmms-eval's return types stay intact).

Requests are grouped by task and generation settings and run `batch_size` at a time (a chat that
ends with the assistant's answer prefix is continued, in a sub-batch of its own) through the
pipeline's batch call (one left-padded batch, one cache). `until` becomes the pipeline's stop
strings: a row stops generating as soon as its text holds one, and its answer ends just before it.
`loglikelihood` and multi-round generation are refused: the engine generates inside a bounded
cache and does not score given continuations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger

from ..loading.checkpoints import load_model
from ..loading.models import resolve_device
from ..pipeline import DBTrimKVPipeline
from .cost import sample_cost, task_summary
from .messages import ends_with_assistant, generation_settings, to_pipeline_messages
from .settings import parse_model_args

REFUSED = ("dbtrimkv answers generate_until requests only: it generates inside a bounded KV cache and does not "
           "score given continuations ({kind}); run the task's generation variant")


@dataclass
class KVCostCounts(TokenCounts):
    """lmms-eval's per-sample token counts plus the engine's KV cost of the sample (`kv` in the log)."""

    kv: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(super().to_dict(), kv=self.kv)


@dataclass
class _Request:
    """One generate_until request, translated for the pipeline."""

    task: str
    ctx: str
    gen_kwargs: dict
    chat: list[dict]
    settings: dict
    until: list[str]


class DBTrimKVLMM(lmms):
    """Qwen3-VL (or the shipped tiny-recall model) under dbtrimkv's KV budget, for lmms-eval."""

    is_simple = False  # a chat model: lmms-eval hands it doc_to_messages, images and videos in place

    def __init__(self, **model_args) -> None:
        super().__init__()
        self.args = parse_model_args(**model_args)  # before the (slow) load
        model, processor = load_model(self.args.pretrained, device=self.args.device, dtype=self.args.dtype)
        self.pipeline = DBTrimKVPipeline(model, processor, self.args.resolve(model), video=self.args.video)
        self.batch_size = self.args.batch_size
        self.costs: dict[str, list[dict]] = {}  # task -> per-sample records of this run
        logger.info(f"dbtrimkv: {self.args.pretrained} with {self.pipeline.config}")

    @property
    def device(self):
        return resolve_device(self.args.device)

    def loglikelihood(self, requests: list[Instance]):
        raise NotImplementedError(REFUSED.format(kind="loglikelihood"))

    def generate_until_multi_round(self, requests: list[Instance]):
        raise NotImplementedError(REFUSED.format(kind="generate_until_multi_round"))

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)  # in the requests' order
        groups: dict[tuple, list[int]] = {}  # same task and generation settings: may share a batch
        for i, request in enumerate(requests):
            _ctx, _messages, gen_kwargs, _doc_id, task, _split = request.args
            groups.setdefault((task, repr(sorted((gen_kwargs or {}).items()))), []).append(i)
        done_before = {task: len(records) for task, records in self.costs.items()}
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]  # media of one batch in memory at a time
                prepared = [self._prepare(requests[i]) for i in batch]
                for continued in (False, True):  # a chat ending with the assistant's prefix is continued
                    part = [(i, r) for i, r in zip(batch, prepared) if ends_with_assistant(r.chat) == continued]
                    if part:
                        for (i, _), result in zip(part, self._run_batch([r for _, r in part], continued)):
                            results[i] = result
        for task, records in self.costs.items():
            self._log_summary(task, records, records[done_before.get(task, 0):])
        return results

    def _prepare(self, request: Instance) -> _Request:
        ctx, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
        chat = to_pipeline_messages(doc_to_messages(self.task_dict[task][split][doc_id]))
        settings, until = generation_settings(gen_kwargs)
        return _Request(task, ctx, gen_kwargs, chat, settings, until)

    def _run_batch(self, batch: list[_Request], continued: bool) -> list[GenerationResult]:
        outputs = self.pipeline([r.chat for r in batch], progress=False, continue_final_message=continued,
                                stop=batch[0].until or None, **batch[0].settings)
        results = []
        for request, out in zip(batch, outputs):
            cost = sample_cost(out, batch_size=len(batch))
            self.costs.setdefault(request.task, []).append(cost)
            counts = KVCostCounts(input_tokens=sum(out.stats.prompt_tokens.values()),
                                  output_tokens=out.stats.new_tokens, kv=cost)
            results.append(GenerationResult(text=out.text, token_counts=counts))
            self.cache_hook.add_partial("generate_until", (request.ctx, request.gen_kwargs), out.text)
        return results

    def _log_summary(self, task: str, records: list[dict], new: list[dict]) -> None:
        """The task's cost summary in the log, and this call's share in lmms-eval's throughput section."""
        summary = task_summary(records)
        logger.info(f"dbtrimkv cost [{task}]: {summary}")
        if not new:
            return
        part = task_summary(new)
        log_metrics(total_elapsed_time=part["prefill_seconds"] + part["decode_seconds"],
                    total_gen_tokens=part["new_tokens"], avg_speed=part["tokens_per_second"],
                    additional_metrics={f"dbtrimkv/{task}/{k}": v for k, v in summary.items()
                                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
