"""The stepper: one engine step over the running batches, and what each request sends back.

Why: running the model is one job, apart from choosing what runs (`scheduler.py`). A request is a row
of a serving cache: it prefills its prompt in chunks of its own `prefill_chunk` (all but the last
token, like `dbtrimkv.generate`), then feeds the last prompt token and decodes one token per step
beside the others; each batch of one eviction setting is one batched forward of the model runner
(`dbtrimkv.runner`: positions, vision per chunk, the forward, decode inputs, rope deltas, sampling).

Faults: a server batches many clients' requests; one bad request (an image that breaks the vision
tower, logits its sampler cannot draw from, a tokenizer error, an out-of-memory) must fail alone
and free its slots, while the others finish with the tokens they get alone. The engine does all
per-row work that can fail (vision encoding, building the row, sampling, detokenizing) row by row
and fails only that row. What remains is the batched forward itself: one that stops halfway leaves
its cache unusable (some layers wrote new entries, some slots were taken and are in no table), with
no row to blame. Then the engine drops that batch's cache, gives the pool back every slot that no
live cache, parked row or session holds (`Scheduler.reclaim`, through `KVStore.reclaim`), and runs each of the batch's requests
again in a batch of its own (`EngineRequest.restart`): batching never changes a row's answer and an
unseeded request keeps the seed it drew, so an innocent request regenerates the tokens it already
sent (they are not sent twice), while the request at fault fails again, alone, and only it gets
the error. A request that continued a session cannot be restarted (its cached history went with
the batch): it gets `BatchFailed` (503, retry: the conversation is prefilled again).
"""

from __future__ import annotations

import time
import traceback

import torch

from ..generation import model_lock
from ..runner.decode import DecodeRow, decode_rows
from ..runner.forward import RowInput, forward_rows
from ..runner.positions import with_input_defaults
from ..runner.prefill import PromptBatch
from ..runner.sampling import Sampler
from ..runner.text import TextTracker
from ..runner.vision import VisionStream
from .api_errors import APIError, BatchFailed
from .metrics import Metrics
from .records import Batch, EngineRequest, Event, StepRecord, as_api_error
from .scheduler import Scheduler


class Stepper:
    """Feeds every running row its next input, samples, and answers through each request's `sink`."""

    def __init__(self, model, tokenizer, stop_ids, scheduler: Scheduler, metrics: Metrics, kv_memory: int):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, stop_ids
        self.device = next(model.parameters()).device
        self.scheduler, self.metrics, self.kv_memory = scheduler, metrics, kv_memory

    def prepare(self, request: EngineRequest) -> None:
        """Prepare the request's prompt (positions, vision stream: the model runner's `PromptBatch`), decode
        row (sampler and stop rule: the model runner's `DecodeRow`) and detokenizer (what may fail on bad input)."""
        parked = request.session.parked if request.session is not None and request.continues else None
        seen, rope_delta = (parked.state.seen, parked.state.rope_delta) if parked is not None else (0, 0)
        request.inputs = with_input_defaults(request.inputs, self.device)  # one row: no padding
        request.prompt = PromptBatch(self.model, request.inputs, [seen], [seen + rope_delta])
        request.tracker = TextTracker(self.tokenizer, request.sampling.stop)
        stop_ids = frozenset() if request.sampling.ignore_eos else frozenset(self.stop_ids)
        request.row = DecodeRow(Sampler(request.sampling, seed=request.seed), stop_ids, request.tracker.done)
        request.tracker.emitted = request.emitted
        request.cached_tokens = seen

    def run_step(self) -> StepRecord:
        """One token boundary: every decoding row feeds a token; prefilling rows feed their next chunk
        within the step's prefill budget (the scheduler's), the others sit out this step. A batch whose
        feeding rows mix prompt chunks and single tokens runs them as two forwards (`phases`)."""
        scheduler = self.scheduler
        waiting = scheduler.sitting_out()
        record = StepRecord(running=len(scheduler.running), pool_bytes=scheduler.pool_bytes)
        for group in list(scheduler.groups.values()):
            for feeding in self.phases(group, waiting) or [set()]:  # (none: every row sits out)
                scheduler.sit_out(group, {r.id for r in group.admitted()} - feeding)
                if group.requests:
                    self._step(group, record)
        return record

    @staticmethod
    def phases(group: Batch, waiting: set[str]) -> list[set[str]]:
        """The ids of the rows each forward of this step feeds: the rows feeding a prompt chunk, then
        those feeding one token (decoding, or a prompt's last token). Rows are left-padded to the widest,
        so one forward of both would compute a chunk's width for every single-token row (15 rows
        decoding beside one 143-token chunk: 2288 columns for 158 tokens). Each row feeds once a step."""
        wide, narrow = set(), set()
        for request in group.admitted():
            if request.id in waiting:
                continue
            start, end = request.next_chunk() if request.prefilled < request.prompt_len else (0, 1)
            (wide if end - start > 1 else narrow).add(request.id)
        return [ids for ids in (wide, narrow) if ids]

    @staticmethod
    def _chunk_input(request: EngineRequest) -> tuple[RowInput, bool]:
        """A prefilling request's next chunk, and whether its last logits give its first token."""
        start, end = request.next_chunk()
        return request.prompt.rows(start, end)[0], end == request.prompt_len

    @staticmethod
    def _encode_vision_together(requests: list[EngineRequest]) -> None:
        """One call of the vision tower for the images and frame groups the rows' chunks reach this step
        (requests that arrive together: one call, not one each). If it fails, nothing is kept and each
        row encodes its own in `_chunk_input`, so the failure falls on the row at fault alone."""
        parts = []
        for request in requests:
            stream = request.prompt.stream
            if stream is not None and request.prefilled < request.prompt_len:
                parts.append((stream, stream.reached([request.next_chunk()])))
        if sum(bool(items) for _, items in parts) > 1:
            try:
                VisionStream.encode(parts)
            except Exception:  # noqa: BLE001 - each row encodes alone next, and the one at fault fails alone
                pass

    def _step(self, group: Batch, record: StepRecord) -> None:
        cache = group.cache
        plans, failed = {}, []
        with torch.no_grad():
            self._encode_vision_together(group.requests)
            tokens = [r.generated[-1] if r.prefilled >= r.prompt_len else None for r in group.requests]
            decoding = decode_rows(self.model, cache, tokens) if any(t is not None for t in tokens) else None
            for b, request in enumerate(group.requests):  # per-row work that may fail on this row's input
                try:
                    plans[request.id] = (decoding[b], True) if tokens[b] is not None else self._chunk_input(request)
                except Exception as exc:  # noqa: BLE001 - fail this request alone
                    failed.append((request, exc))
        for request, exc in failed:
            self._retire(group, request, None, error=as_api_error(exc))
        requests = list(group.requests)
        if not requests:
            return
        plans = [plans[r.id] for r in requests]
        try:
            with model_lock(self.model), torch.inference_mode():
                logits = forward_rows(self.model, cache, [p[0] for p in plans])
        except Exception as exc:  # noqa: BLE001 - no row to blame: restart them alone (see the module docstring)
            traceback.print_exc()
            self._forward_failed(group, requests, exc)
            return
        self.metrics.inc("engine_steps_total")
        record.views_bytes = max(record.views_bytes, self.scheduler.views_bytes())  # before retiring drops this batch's views
        if self.scheduler.pool_bytes + record.views_bytes > self.kv_memory:
            raise RuntimeError("the KV pool and views hold more than --kv-memory; admission control is broken")
        now = time.monotonic()
        finished = []
        for b, (request, (row_input, samples)) in enumerate(zip(requests, plans)):
            if request.prefilled < request.prompt_len:
                request.prefilled += row_input.ids.numel()
                record.prefill_tokens += row_input.ids.numel()
                self.metrics.inc("prompt_tokens_total", row_input.ids.numel())
                if request.prefilled == request.prompt_len:
                    request.prompt.finish(cache, request.prompt_len, [b])
            else:
                record.decode_tokens += 1
            if not samples:
                continue
            try:
                reason = self._accept(request, request.row.sample(logits[b]), now)
            except Exception as exc:  # noqa: BLE001 - a sampling or tokenizer failure fails this request alone
                finished.append((request, None, as_api_error(exc)))
                continue
            if reason is not None:
                finished.append((request, reason, None))
        for request, reason, error in finished:
            self._retire(group, request, reason, error=error)

    def _forward_failed(self, group: Batch, requests: list[EngineRequest], exc: Exception) -> None:
        """A batched forward failed: drop the batch's cache, reclaim its slots, restart its requests alone
        (the one at fault then fails alone); a request alone in its batch is the one at fault."""
        scheduler = self.scheduler
        self.metrics.inc("batch_failures_total")
        group.cache, group.requests = scheduler.new_cache(requests[0].config), []
        scheduler.reclaim()
        restarts = []
        for request in requests:
            scheduler.admission.release(request.id)
            if len(requests) == 1 or request.solo:
                request.sink(Event("error", error=as_api_error(exc)))
            elif request.continues:
                request.sink(Event("error", error=BatchFailed(
                    "this request's batch failed under another request, and its session's cached history went "
                    "with it; send it again (the whole conversation will be prefilled)")))
            else:
                request.restart()
                request.reservation = scheduler.limits.reservation_for(request)
                restarts.append(request)
        scheduler.requeue(restarts)
        group.cache.set_views_limit(scheduler.admission.group_view_bytes(group.key))
        scheduler.drop_if_idle(group)

    def _accept(self, request: EngineRequest, token: int, now: float) -> str | None:
        """Record a sampled token, send its text; returns the finish reason if the request is done."""
        if request.first_token_at is None:
            request.first_token_at = now
            self.metrics.observe("time_to_first_token_seconds", now - request.arrival)
        else:
            self.metrics.observe("time_per_output_token_seconds", now - request.last_token_at)
        request.last_token_at = now
        self.metrics.inc("generation_tokens_total")
        first = not request.generated
        request.unsent += "" if request.row.stops_at(token) else request.tracker.add(token)
        request.unsent_tokens += 1
        every = request.send_every
        if request.unsent and every is not None and (first or request.unsent_tokens >= every):
            request.sink(Event("token", text=request.unsent))  # (a streamed request's text: --stream-interval)
            request.unsent, request.unsent_tokens = "", 0
        return request.row.record(token, request.sampling.max_tokens)  # the model runner's rule: stop, length

    def _retire(self, group: Batch, request: EngineRequest, reason: str | None, error: APIError | None = None) -> None:
        """Take a request out of its batch (the scheduler parks or frees its row) and tell the client."""
        tail = request.unsent + request.tracker.flush() if error is None else ""  # (before a session keeps the reply's text)
        self.scheduler.retire(group, request, reason)
        if error is not None:
            request.sink(Event("error", error=error))
            return
        if tail:
            request.sink(Event("token", text=tail))
        if request.first_token_at is not None:
            self.metrics.observe("request_latency_seconds", time.monotonic() - request.arrival)
        self.metrics.inc("cached_prompt_tokens_total", request.cached_tokens)
        prompt = request.cached_tokens + request.prompt_len  # OpenAI: cached tokens are part of the prompt
        usage = {"prompt_tokens": prompt, "completion_tokens": len(request.generated),
                 "total_tokens": prompt + len(request.generated),
                 "prompt_tokens_details": {"cached_tokens": request.cached_tokens}}
        request.sink(Event("done", finish_reason=reason, usage=usage))
