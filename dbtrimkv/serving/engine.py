"""The engine loop: continuous batching of chat requests inside one bounded KV memory.

Why: one thread owns the model, the pool and the views. At every token boundary (one engine step)
it drops cancelled requests (their slots return to the pool at once), admits waiting requests
whose bound and views fit (`admission.py`), runs one batched forward per eviction setting
(`batch_step.py`), samples, and retires finished requests (a session's row is parked in the pool
for its next turn). Each request is a row of a serving cache: it prefills its prompt in chunks of
its own `prefill_chunk` (all but the last token, like `dbtrimkv.generate`), then feeds the last
prompt token and decodes one token per step beside the others.

Prefill budget: a step feeds at most `max_prefill_tokens` prompt tokens (decoding rows always feed
their token). Prefilling rows get their next chunk oldest first while the budget lasts; a row
left out sits out of the batch for that step (parked: slots kept, nothing fed, no eviction) and
comes back with the same chunk later, so its answer is what it gets alone and many long prompts
admitted together never make one long step that stalls the decoders.

Results go back through each request's `sink` (called from this thread; the HTTP layer hands
them to its event loop). A failure while serving one request fails that request alone (`recovery.py`).
`steps` records, per engine step, the prompt and decode tokens fed and the
pool and view bytes held (bounded; tests and the benchmark read it).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..cache import DBTrimKVCache, SlotPool
from ..cache.cache import uses_views
from ..cache.requests import ParkedSequence
from ..cache.views import KVViews
from ..config import DBTrimKVConfig
from ..errors import ConfigError
from ..errors import DBTrimKVError
from ..gates import text_config_of
from ..generation import (VisionStream, decode_positions, is_vision_language, model_lock, rope_deltas,
                          token_positions, with_input_defaults)
from ..pipeline import stop_token_ids
from ..prompts import tokenizer_of
from .admission import Admission, Reservation, request_bound, slot_bytes, split_memory, view_columns
from .api_errors import APIError, BatchFailed, InternalError, QueueFull, TooLarge, Unavailable
from .api_errors import BadRequest
from .batch_step import RowInput, encode_vision, forward_rows
from .detokenize import TextTracker
from .metrics import Metrics
from .recovery import reclaim_pool
from .sampling import Sampler, SamplingParams
from .schema import canonical_reply
from .sessions import Session, SessionStore


@dataclass
class Event:
    kind: str  # "token" (text piece), "done" (finish_reason, usage) or "error" (APIError)
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    error: APIError | None = None


def config_key(config: DBTrimKVConfig) -> tuple:
    return tuple(sorted((k, tuple(sorted(v.items())) if isinstance(v, dict) else v)  # policy_options is a dict
                        for k, v in config.to_dict().items()))


@dataclass
class EngineRequest:
    """One chat completion: its new tokens (processor outputs, batch 1) and how to answer."""

    id: str
    inputs: dict
    config: DBTrimKVConfig
    sampling: SamplingParams
    sink: Callable[[Event], None]
    session_id: str | None = None
    session: Session | None = None  # a reserved session: continued, or replaced when `continues` is False
    continues: bool = False
    history: list[tuple] = field(default_factory=list)  # the request's messages, canonical (for its session)
    arrival: float = field(default_factory=time.monotonic)
    # set by the engine
    prompt_len: int = 0
    bound: int = 0
    reservation: Reservation | None = None
    cached_tokens: int = 0
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    positions: torch.Tensor | None = None
    vision: VisionStream | None = None
    sampler: Sampler | None = None
    tracker: TextTracker | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    solo: bool = False  # runs in a batch of its own (restarted after its batch's forward failed)
    seed: int | None = None  # the seed its sampler drew (kept by a restart)
    emitted: int = 0  # characters of its answer already sent (by a run before a restart)

    def __post_init__(self):
        self.prompt_len = int(self.inputs["input_ids"].shape[1])

    def restart(self) -> None:
        """Start again from the first prompt token, alone, with the same seed; what was sent is not sent again."""
        self.seed = self.sampler.seed if self.sampler is not None else self.seed
        self.emitted = self.tracker.emitted if self.tracker is not None else self.emitted
        self.prefilled, self.generated, self.positions, self.vision = 0, [], None, None
        self.solo = True


@dataclass
class StepRecord:
    """One engine step: requests admitted, prompt tokens and decode tokens fed, and the most KV bytes
    held during it."""

    running: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    pool_bytes: int = 0
    views_bytes: int = 0


class _Group:
    """Running requests with one eviction setting: the rows of one serving cache, in row order, and
    the prefilling requests sitting out this step (`paused`, parked out of the cache)."""

    def __init__(self, key: tuple, cache, solo: bool = False):
        self.key, self.cache, self.requests, self.solo = key, cache, [], solo
        self.paused: dict[str, tuple[EngineRequest, ParkedSequence]] = {}


MAX_STEP_RECORDS = 100_000


class Engine:
    def __init__(self, model, processor, config: DBTrimKVConfig, kv_memory: int, max_running: int = 16,
                 max_queue: int = 64, max_sessions: int = 64, max_prefill_tokens: int | None = None,
                 metrics: Metrics | None = None):
        """`kv_memory` bytes pay for the pool and (on CPU) the attention views; a step feeds at most
        `max_prefill_tokens` prompt tokens (default: max(2048, the prefill chunk))."""
        text = text_config_of(model)
        self.model, self.processor, self.config = model, processor, config
        self.tokenizer = tokenizer_of(processor)
        self.stop_ids = stop_token_ids(model, self.tokenizer)
        self.num_layers, self.num_kv_heads = text.num_hidden_layers, text.num_key_value_heads
        self.segments = self.num_layers * self.num_kv_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.vision_language = is_vision_language(model)
        if config.resolve_budget(self.num_layers, self.num_kv_heads) is None:
            raise ConfigError("the server needs a KV budget (--budget or --memory-size): admission control relies on "
                              "each request's bound, and a full cache has none")
        self.max_prefill_tokens = max(2048, config.prefill_chunk) if max_prefill_tokens is None else max_prefill_tokens
        if self.max_prefill_tokens < config.prefill_chunk:
            raise ConfigError(f"--max-prefill-tokens-per-step ({self.max_prefill_tokens}) must be at least the prefill "
                              f"chunk ({config.prefill_chunk}): a chunk is never split (that would change answers)")
        self.kv_memory = int(kv_memory)
        self.slot_bytes = slot_bytes(self.head_dim, self.dtype)
        views = uses_views(torch.empty(0, dtype=self.dtype, device=self.device))
        self.row_view_bytes = self._row_view_bytes if views else None
        bound = self.bound_for(config, config.prefill_chunk)
        default_views = (self.row_view_bytes(view_columns(bound, self.segments, bound, config.buffer_size))
                         if views else 0)
        pool_slots, view_bytes = split_memory(self.kv_memory, self.slot_bytes, bound, default_views)
        self.pool = SlotPool(self.head_dim, self.dtype, self.device)
        if pool_slots:
            self.pool.ensure_free(pool_slots, limit=pool_slots)  # allocated once; it never grows
        self.admission = Admission(pool_slots, view_bytes, self.row_view_bytes)
        self.sessions = SessionStore(max_sessions)
        self.session_files = None  # session_store.SessionFiles (--session-store), set by create_server
        self.metrics = metrics or Metrics()
        self.max_running, self.max_queue = max_running, max_queue
        self.groups: dict[tuple, _Group] = {}
        self.steps: deque[StepRecord] = deque(maxlen=MAX_STEP_RECORDS)
        self.waiting: deque[EngineRequest] = deque()
        self.cancelled: set[str] = set()
        self.cond = threading.Condition()
        self.stopping = False
        self._thread: threading.Thread | None = None
        self._evictions = (0, 0)
        self.metrics.set("kv_memory_bytes", self.kv_memory)
        self.metrics.set("kv_pool_slots", pool_slots)
        self.metrics.set("kv_pool_bytes", self.pool_bytes)
        self.metrics.set("kv_views_limit_bytes", view_bytes)
        self.metrics.set("kv_request_bound_slots", bound)
        self.metrics.set("kv_request_views_bytes", default_views)
        self.metrics.set("max_prefill_tokens_per_step", self.max_prefill_tokens)

    # --- limits ------------------------------------------------------------------------------
    def bound_for(self, config: DBTrimKVConfig, new_tokens: int) -> int:
        budget = config.resolve_budget(self.num_layers, self.num_kv_heads)
        return request_bound(budget, self.segments, config.buffer_size, config.prefill_chunk, new_tokens)

    def _row_view_bytes(self, columns: int) -> int:
        return KVViews.planned_bytes(self.num_layers, 1, self.num_kv_heads, columns, self.head_dim, self.dtype)

    def reservation_for(self, request: EngineRequest) -> Reservation:
        """The request's bound in the pool and its view columns (from every token it can ever see)."""
        bound = self.bound_for(request.config, request.prompt_len)
        cached = request.session.parked.state.seen if request.continues and request.session is not None else 0
        seen_max = cached + request.prompt_len + request.sampling.max_tokens
        return Reservation(bound, self.group_key(request),
                           view_columns(bound, self.segments, seen_max, request.config.buffer_size))

    @staticmethod
    def group_key(request: EngineRequest) -> tuple:
        """The batch a request joins: the one of its eviction setting, or its own after a failed batch."""
        key = config_key(request.config)
        return (key, request.id) if request.solo else key

    @property
    def slots_in_use(self) -> int:
        return self.pool.capacity - self.pool.num_free

    @property
    def pool_bytes(self) -> int:
        """Bytes of the pool (allocated once)."""
        return self.pool.capacity * self.slot_bytes

    def views_bytes(self) -> int:
        """Bytes the attention views hold now, over all batches."""
        return sum(g.cache.views_bytes() for g in list(self.groups.values()))

    @property
    def running(self) -> list[EngineRequest]:
        """Admitted requests: the rows of every batch and those sitting out this step."""
        return [r for g in list(self.groups.values())
                for r in list(g.requests) + [p[0] for p in list(g.paused.values())]]

    # --- called from other threads -----------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dbtrimkv-engine", daemon=True)
        self._thread.start()

    def submit(self, request: EngineRequest) -> None:
        if request.config.prefill_chunk > self.max_prefill_tokens:
            raise BadRequest(f"prefill chunk {request.config.prefill_chunk} is larger than the server's prefill budget "
                             f"per step ({self.max_prefill_tokens})")
        reservation = self.reservation_for(request)
        if not self.admission.alone_fits(reservation):
            views = self.row_view_bytes(reservation.view_columns) if self.row_view_bytes is not None else 0
            raise TooLarge(f"this request may hold up to {reservation.slots} KV entries and {views} bytes of attention "
                           f"views, more than the whole pool ({self.admission.pool_slots} entries) or view memory "
                           f"({self.admission.view_bytes} bytes); lower its budget or prefill chunk, or start the "
                           "server with more --kv-memory")
        request.bound, request.reservation = reservation.slots, reservation
        with self.cond:
            if self.stopping:
                raise Unavailable("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                self.metrics.inc("requests_rejected_total", label=("status", "429"))
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later", retry_after=1)
            self.waiting.append(request)
            self.metrics.set("requests_waiting", len(self.waiting))
            self.cond.notify()

    def cancel(self, request_id: str) -> None:
        """The client went away: free the request's slots at the next token boundary."""
        with self.cond:
            self.cancelled.add(request_id)
            self.cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.cancelled and not self.running and not self.waiting:
                    self.cond.wait()
                cancelled, self.cancelled = self.cancelled, set()
                if self.stopping:
                    break
            try:
                self._drop_cancelled(cancelled)
                self._admit()
                self._run_step()
                self._update_gauges()
            except Exception as exc:  # noqa: BLE001 - a bug must fail requests, not hang every client
                traceback.print_exc()
                self._fail_all(InternalError(f"the engine failed: {type(exc).__name__}: {exc}"))
            if not self.running and self.waiting and not self.cancelled:
                with self.cond:  # nothing fits (room held by busy sessions): wait for a change
                    self.cond.wait(0.05)
        self._shutdown()

    def _shutdown(self) -> None:
        self._fail_all(Unavailable("the server is shutting down"))
        if self.session_files is not None:  # --session-store: parked sessions outlive the server
            for session in self.sessions.drop_all():
                self._free_session(session)

    def _fail_all(self, error: APIError) -> None:
        with self.cond:
            waiting, self.waiting = list(self.waiting), deque()
        for request in waiting:
            if request.session is not None:
                self.sessions.unreserve(request.session)
            request.sink(Event("error", error=error))
        groups, self.groups = list(self.groups.values()), {}  # their caches may be mid-forward: drop them whole
        for group in groups:
            for request in list(group.requests) + [p[0] for p in list(group.paused.values())]:
                self.admission.release(request.id)
                request.sink(Event("error", error=error))
        self._reclaim()

    def _drop_cancelled(self, ids: set[str]) -> None:
        if not ids:
            return
        with self.cond:
            kept = deque(r for r in self.waiting if r.id not in ids)
            gone = [r for r in self.waiting if r.id in ids]
            self.waiting = kept
        for request in gone:
            if request.session is not None:
                self.sessions.unreserve(request.session)
        for group in list(self.groups.values()):
            for request in [r for r in list(group.requests) + [p[0] for p in group.paused.values()] if r.id in ids]:
                self._retire(group, request, "cancelled")

    def _admit(self) -> None:
        """First come, first served; only when nothing runs may a later request that fits pass a head
        that cannot (its room is held by a session whose next turn waits behind it)."""
        while True:
            with self.cond:
                if not self.waiting or len(self.running) >= self.max_running:
                    return
                candidates = list(self.waiting) if not self.running else [self.waiting[0]]
            request = next((r for r in candidates if self._make_room(r)), None)
            if request is None:
                return
            with self.cond:
                self.waiting.remove(request)
            try:
                self._start(request)
            except Exception as exc:  # noqa: BLE001 - a bad request must not stop the engine (it failed before joining)
                if request.session is not None:
                    self.sessions.unreserve(request.session)
                request.sink(Event("error", error=_as_api_error(exc)))

    def _make_room(self, request: EngineRequest) -> bool:
        """Does the request fit, after dropping idle sessions least recently used first if the pool needs
        it? (Sessions hold no views: dropping them frees no view memory.)"""
        if not self.admission.views_fit(request.reservation):
            return False
        releasing = request.session.parked.num_slots if request.session is not None else 0
        while not self.admission.slots_fit(request.reservation, releasing):
            dropped = self.sessions.drop_least_recent("the pool needed the room for a new request")
            if dropped is None:
                return False
            self._free_session(dropped)
        return True

    def _start(self, request: EngineRequest) -> None:
        """Prepare the request's positions and streams (what may fail on bad input), then add its row."""
        parked = request.session.parked if request.session is not None and request.continues else None
        seen, rope_delta = (parked.state.seen, parked.state.rope_delta) if parked is not None else (0, 0)
        request.inputs = with_input_defaults(request.inputs, self.device)  # one row: no padding
        mask, types = request.inputs["attention_mask"], request.inputs["mm_token_type_ids"]
        request.positions = token_positions(self.model, request.inputs, mask, [seen], [seen + rope_delta])[..., 0, :]
        if self.vision_language and bool(types.any()):
            request.vision = VisionStream(self.model, request.inputs, types, mask)
        request.sampler = Sampler(request.sampling, seed=request.seed)
        request.tracker = TextTracker(self.tokenizer, request.sampling.stop)
        request.tracker.emitted = request.emitted
        request.cached_tokens = seen
        if request.session is not None and not request.solo:  # (a restart took its session over already)
            self.sessions.take(request.session.id)
            self.admission.unpark(request.session.id)
            if parked is None:
                self.pool.release(request.session.parked.slots)
        key = request.reservation.group
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = _Group(key, self._new_cache(request.config), request.solo)
        if parked is not None and request.session.saved is not None:  # read back from the session store
            parked = self.session_files.place(request.session, self.pool, group.cache)
            self.metrics.inc("sessions_restored_total")
        group.cache.add_sequence(parked)
        group.requests.append(request)
        self.admission.admit(request.id, request.reservation)
        group.cache.set_views_limit(self.admission.group_view_bytes(key))

    # --- one step --------------------------------------------------------------------------------
    @staticmethod
    def _next_chunk(request: EngineRequest) -> tuple[int, int]:
        """Prompt columns [start, end) the request feeds next: a chunk of all but the last prompt token,
        then the last one alone (its logits give the first generated token)."""
        total, start = request.prompt_len, request.prefilled
        return start, total if start == total - 1 else min(total - 1, start + request.config.prefill_chunk)

    def _run_step(self) -> None:
        """One token boundary: every decoding row feeds a token; prefilling rows feed their next chunk,
        oldest first, while the step's prefill budget lasts; the others sit out this step."""
        prefilling = sorted((r for r in self.running if r.prefilled < r.prompt_len), key=lambda r: r.arrival)
        budget, granted = self.max_prefill_tokens, set()
        for request in prefilling:
            start, end = self._next_chunk(request)
            if end - start <= budget:
                budget -= end - start
                granted.add(request.id)
        record = StepRecord(running=len(self.running), pool_bytes=self.pool_bytes)
        for group in list(self.groups.values()):
            self._sit_out(group, {r.id for r in prefilling} - granted)
            if group.requests:
                self._step(group, record)
        if record.prefill_tokens or record.decode_tokens:
            self.steps.append(record)
            self.metrics.observe("step_prefill_tokens", record.prefill_tokens)
            self.metrics.set("step_prefill_tokens_peak", max(self.metrics.get("step_prefill_tokens_peak"),
                                                             record.prefill_tokens))
            self.metrics.set("kv_views_bytes_peak", max(self.metrics.get("kv_views_bytes_peak"), record.views_bytes))

    def _sit_out(self, group: _Group, waiting: set[str]) -> None:
        """Park the rows that feed nothing this step out of the batch; bring back those that feed again."""
        for request in [r for r in group.requests if r.id in waiting]:
            parked = group.cache.park_sequence(group.requests.index(request))
            group.requests.remove(request)
            group.paused[request.id] = (request, parked)
        for request_id in [i for i in group.paused if i not in waiting]:
            request, parked = group.paused.pop(request_id)
            group.cache.add_sequence(parked)
            group.requests.append(request)

    def _row_input(self, request: EngineRequest, cache, row: int) -> tuple[RowInput, bool]:
        """What a request feeds this step, and whether its last logits give its next token."""
        total = request.prompt_len
        if request.prefilled < total:
            start, end = self._next_chunk(request)
            ids = request.inputs["input_ids"][0, start:end]
            vision = encode_vision(self.model, request.vision, start, end) if request.vision is not None else None
            return RowInput(ids, request.positions[..., start:end], request.inputs["mm_token_type_ids"][0, start:end],
                            vision), end == total
        pos = decode_positions(self.model, [cache.requests[row]], self.device)[..., 0, :]
        token = torch.tensor([request.generated[-1]], device=self.device)
        return RowInput(token, pos, torch.zeros_like(token)), True

    def _step(self, group: _Group, record: StepRecord) -> None:
        cache = group.cache
        plans, failed = {}, []
        for b, request in enumerate(group.requests):  # per-row work that may fail on this row's input
            try:
                plans[request.id] = self._row_input(request, cache, b)
            except Exception as exc:  # noqa: BLE001 - fail this request alone
                failed.append((request, exc))
        for request, exc in failed:
            self._retire(group, request, None, error=_as_api_error(exc))
        requests = list(group.requests)
        if not requests:
            return
        plans = [plans[r.id] for r in requests]
        try:
            with model_lock(self.model), torch.inference_mode():
                logits = forward_rows(self.model, cache, [p[0] for p in plans])
        except Exception as exc:  # noqa: BLE001 - no row to blame: restart them alone (recovery.py)
            traceback.print_exc()
            self._forward_failed(group, requests, exc)
            return
        self.metrics.inc("engine_steps_total")
        record.views_bytes = max(record.views_bytes, self.views_bytes())  # before retiring drops this batch's views
        if self.pool_bytes + record.views_bytes > self.kv_memory:
            raise RuntimeError("the KV pool and views hold more than --kv-memory; admission control is broken")
        now = time.monotonic()
        finished = []
        for b, (request, (row_input, samples)) in enumerate(zip(requests, plans)):
            if request.prefilled < request.prompt_len:
                request.prefilled += row_input.ids.numel()
                record.prefill_tokens += row_input.ids.numel()
                self.metrics.inc("prompt_tokens_total", row_input.ids.numel())
                if request.prefilled == request.prompt_len and self.vision_language:
                    positions = request.positions[:, None]  # [4, 1, prompt]: the whole prompt, no padding
                    delta = rope_deltas(positions, torch.ones_like(positions[0]), [cache.requests[b].seen])[0]
                    if delta is not None:
                        cache.set_rope_delta(b, delta)
            else:
                record.decode_tokens += 1
            if not samples:
                continue
            try:
                reason = self._accept(request, request.sampler(logits[b]), now)
            except Exception as exc:  # noqa: BLE001 - a sampling or tokenizer failure fails this request alone
                finished.append((request, None, _as_api_error(exc)))
                continue
            if reason is not None:
                finished.append((request, reason, None))
        for request, reason, error in finished:
            self._retire(group, request, reason, error=error)

    def _forward_failed(self, group: _Group, requests: list[EngineRequest], exc: Exception) -> None:
        """A batched forward failed: drop the batch's cache, reclaim its slots, restart its requests alone
        (the one at fault then fails alone); a request alone in its batch is the one at fault."""
        self.metrics.inc("batch_failures_total")
        group.cache, group.requests = self._new_cache(requests[0].config), []
        self._reclaim()
        restarts = []
        for request in requests:
            self.admission.release(request.id)
            if len(requests) == 1 or request.solo:
                request.sink(Event("error", error=_as_api_error(exc)))
            elif request.continues:
                request.sink(Event("error", error=BatchFailed(
                    "this request's batch failed under another request, and its session's cached history went "
                    "with it; send it again (the whole conversation will be prefilled)")))
            else:
                request.restart()
                request.reservation = self.reservation_for(request)
                restarts.append(request)
        self.metrics.inc("requests_restarted_total", len(restarts))
        with self.cond:
            self.waiting.extendleft(reversed(restarts))  # first in line, in their order
        group.cache.set_views_limit(self.admission.group_view_bytes(group.key))
        self._drop_if_idle(group)

    def _new_cache(self, config: DBTrimKVConfig) -> DBTrimKVCache:
        cache = DBTrimKVCache(self.model, config)
        cache.use_pool(self.pool)
        return cache

    def _drop_if_idle(self, group: _Group) -> None:
        """A solo batch goes away with its request (the shared batches of eviction settings stay)."""
        if group.solo and not group.requests and not group.paused:
            self.groups.pop(group.key, None)

    def _reclaim(self) -> None:
        """Give the pool back every slot no batch row, parked row or session holds."""
        in_use = [g.cache.retained_slots(b) for g in self.groups.values() for b in range(len(g.cache.requests))]
        in_use += [parked.slots for g in self.groups.values() for _, parked in g.paused.values()]
        lost = reclaim_pool(self.pool, in_use + self.sessions.slot_ids())
        self.metrics.inc("kv_slots_reclaimed_total", lost)

    def _accept(self, request: EngineRequest, token: int, now: float) -> str | None:
        """Record a sampled token, send its text; returns the finish reason if the request is done."""
        if request.first_token_at is None:
            request.first_token_at = now
            self.metrics.observe("time_to_first_token_seconds", now - request.arrival)
        else:
            self.metrics.observe("time_per_output_token_seconds", now - request.last_token_at)
        request.last_token_at = now
        request.generated.append(token)
        self.metrics.inc("generation_tokens_total")
        end_of_text = token in self.stop_ids and not request.sampling.ignore_eos
        piece = "" if end_of_text else request.tracker.add(token)
        if piece:
            request.sink(Event("token", text=piece))
        if end_of_text or request.tracker.stopped:
            return "stop"
        if len(request.generated) >= request.sampling.max_tokens:
            return "length"
        return None

    def _retire(self, group: _Group, request: EngineRequest, reason: str | None, error: APIError | None = None) -> None:
        """Take a request out of the batch: park its session row or free its slots; tell the client."""
        if request.id in group.paused:
            parked = group.paused.pop(request.id)[1]
        else:
            row = group.requests.index(request)
            group.requests.pop(row)
            parked = group.cache.park_sequence(row)
        self.admission.release(request.id)
        group.cache.set_views_limit(self.admission.group_view_bytes(group.key))
        self._drop_if_idle(group)
        keep = request.session_id is not None and reason in ("stop", "length")
        if keep:
            reply = request.tracker.text
            session = Session(request.session_id, config_key(request.config), request.history + [canonical_reply(reply)],
                              parked, list(request.generated))
            self.admission.park(session.id, parked.num_slots)
            if self.session_files is not None and self.session_files.write_through:  # every turn on disk (replicas)
                self.session_files.spill(session, self.pool, group.cache)
            for dropped in self.sessions.park(session):
                self._free_session(dropped)
        else:
            self.pool.release(parked.slots)
        if reason is not None:
            self.metrics.inc("requests_finished_total", label=("reason", reason))
        if reason == "cancelled":
            return
        if error is not None:
            request.sink(Event("error", error=error))
            return
        tail = request.tracker.flush()
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

    def _free_session(self, session: Session) -> None:
        if self.session_files is not None:  # --session-store: spilled, resumed later without re-prefill
            group = self.groups.get(session.config_key)
            self.session_files.spill(session, self.pool, group.cache if group is not None else None)
            self.metrics.inc("sessions_spilled_total")
        self.admission.unpark(session.id)
        self.pool.release(session.parked.slots)

    def live_gauges(self) -> None:
        """Set the gauges from the current state (also called when /metrics is read)."""
        m = self.metrics
        m.set("requests_running", len(self.running))
        m.set("requests_waiting", len(self.waiting))
        m.set("sessions_parked", len(self.sessions))
        m.set("kv_slots_in_use", self.slots_in_use)
        m.set("kv_slots_reserved", self.admission.reserved)
        m.set("kv_views_bytes", self.views_bytes())
        m.set("kv_views_reserved_bytes", self.admission.views_reserved())

    def _update_gauges(self) -> None:
        m = self.metrics
        self.live_gauges()
        m.set("kv_slots_in_use_peak", max(m.get("kv_slots_in_use_peak"), self.slots_in_use))
        evictions = sum(g.cache.num_evictions for g in self.groups.values())
        evicted = sum(g.cache.evicted_entries for g in self.groups.values())
        m.inc("evictions_total", evictions - self._evictions[0])
        m.inc("evicted_entries_total", evicted - self._evictions[1])
        self._evictions = (evictions, evicted)
        m.set("kv_views_skipped_total", sum(g.cache.views_skipped for g in self.groups.values()))
        if self.pool.capacity != self.admission.pool_slots:
            raise RuntimeError("the KV pool grew past its start-up size; admission control is broken")


def _as_api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, DBTrimKVError):
        return BadRequest(str(exc))
    return InternalError(f"the engine failed on this request: {type(exc).__name__}: {exc}")
