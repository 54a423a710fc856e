"""The scheduler: the queue, admission of waiting requests, the prefill budget of each step, the
batches of running rows and the parked sessions.

Why: what runs next and where its KV entries live is one job, apart from running the model
(`stepper.py`) and from the thread that alternates the two (`engine.py`). First come, first served;
a request joins when its bound and views fit (`admission.py`), after dropping idle sessions least
recently used first if the pool needs the room. A step feeds at most `max_prefill_tokens` prompt
tokens: prefilling rows get their next chunk oldest first while the budget lasts, and a row left out
sits out of its batch for that step (parked: slots kept, nothing fed, no eviction), so its answer is
the one it gets alone. A finished request's session row is parked in the pool for its next turn.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

import torch

from ..cache import DBTrimKVCache, SlotPool
from ..cache.store import KVStore
from ..cache.views import KVViews
from ..settings.config import DBTrimKVConfig
from ..errors import ConfigError
from ..runner.pending import keep_pending
from . import refusals
from .admission import Admission, Reservation, request_bound, slot_bytes, view_columns
from .api_errors import APIError, BadRequest, QueueFull, TooLarge, Unavailable
from .metrics import Metrics
from .records import Batch, EngineRequest, Event, as_api_error, config_key
from .schema import canonical_reply
from .sessions import Session, SessionStore


class Limits:
    """A model's KV geometry and the server's budget: each request's budget, its bound in the pool and
    its attention-view columns."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, views: bool,
                 server_budget: int):
        self.num_layers, self.num_kv_heads, self.head_dim, self.dtype = num_layers, num_kv_heads, head_dim, dtype
        self.segments = num_layers * num_kv_heads
        self.slot_bytes = slot_bytes(head_dim, dtype)
        self.row_view_bytes = self._row_view_bytes if views else None  # None: this device uses no views
        self.server_budget = server_budget

    def admit(self, request: EngineRequest, step_budget: int) -> Reservation:
        """A new request's budget, resolved here once and stored on it (`EngineRequest.budget`: everything
        after, a restart included, reads it from there), and its reservation. A 400 if its settings keep
        more than the server's budget or its prefill chunk exceeds the step's prefill budget."""
        config = request.config
        if config.prefill_chunk > step_budget:
            raise BadRequest(refusals.chunk_over_step_budget(config.prefill_chunk, step_budget))
        try:
            budget = config.resolve_budget(self.num_layers, self.num_kv_heads)
        except ConfigError as exc:
            raise BadRequest(f"eviction: {exc}", param="eviction") from None
        if budget is None or budget > self.server_budget:
            raise BadRequest(refusals.budget_over_server(budget, self.server_budget), param="eviction")
        request.budget = budget
        return self.reservation_for(request)

    def bound_for(self, budget: int, config: DBTrimKVConfig, new_tokens: int) -> int:
        """Most pool slots a sequence keeping `budget` entries holds when it feeds `new_tokens` at most."""
        return request_bound(budget, self.segments, config.buffer_size, config.prefill_chunk, new_tokens)

    def _row_view_bytes(self, columns: int) -> int:
        return KVViews.planned_bytes(self.num_layers, 1, self.num_kv_heads, columns, self.head_dim, self.dtype)

    def reservation_for(self, request: EngineRequest) -> Reservation:
        """The request's bound in the pool and its view columns (from every token it can ever see)."""
        bound = self.bound_for(request.budget, request.config, request.prompt_len)
        cached = request.session.parked.state.seen if request.continues and request.session is not None else 0
        seen_max = cached + request.prompt_len + request.sampling.max_tokens
        return Reservation(bound, self.group_key(request),
                           view_columns(bound, self.segments, seen_max, request.config.buffer_size))

    @staticmethod
    def group_key(request: EngineRequest) -> tuple:
        """The batch a request joins: the one of its eviction setting, or its own after a failed batch."""
        key = config_key(request.config)
        return (key, request.id) if request.solo else key


class Scheduler:
    """The waiting queue (shared with the server's threads under `cond`), the running batches, the
    pool's reservations and the parked sessions."""

    def __init__(self, model, limits: Limits, pool: SlotPool, admission: Admission, sessions: SessionStore,
                 metrics: Metrics, max_running: int, max_queue: int, max_prefill_tokens: int):
        self.model, self.limits, self.pool, self.admission, self.sessions = model, limits, pool, admission, sessions
        # the free list is changed only through a `KVStore`: this one frees rows out of any batch
        self.store = KVStore(limits.num_layers, limits.num_kv_heads, limits.head_dim)
        self.store.initialize(0, pool.device, pool.dtype, pool)
        self.metrics, self.max_running, self.max_queue = metrics, max_running, max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.session_files = None  # session_store.SessionFiles (--session-store), set by create_server
        self.groups: dict[tuple, Batch] = {}
        self.waiting: deque[EngineRequest] = deque()
        self.cancelled: set[str] = set()
        self.cond = threading.Condition()
        self.stopping = False

    @property
    def running(self) -> list[EngineRequest]:
        """Admitted requests: the rows of every batch and those sitting out this step."""
        return [r for g in list(self.groups.values()) for r in g.admitted()]

    @property
    def pool_bytes(self) -> int:
        """Bytes of the pool (allocated once)."""
        return self.pool.capacity * self.limits.slot_bytes

    def views_bytes(self) -> int:
        """Bytes the attention views hold now, over all batches."""
        return sum(g.cache.views_bytes() for g in list(self.groups.values()))

    # --- the queue (called from other threads) -------------------------------------------------
    def submit(self, request: EngineRequest) -> None:
        """Take a new request: its budget and reservation (`Limits.admit`), refused with 413 if it could
        never run even alone, then queued (429 if the queue is full)."""
        reservation = self.limits.admit(request, self.max_prefill_tokens)
        if (refusal := self.admission.never_fits(reservation)) is not None:
            raise TooLarge(refusal)
        request.bound, request.reservation = reservation.slots, reservation
        self.enqueue(request)

    def enqueue(self, request: EngineRequest) -> None:
        with self.cond:
            if self.stopping:
                raise Unavailable(refusals.shutting_down())
            if len(self.waiting) >= self.max_queue:
                self.metrics.inc("requests_rejected_total", label=("status", "429"))
                raise QueueFull(refusals.queue_full(self.max_queue), retry_after=1)
            self.waiting.append(request)
            self.metrics.set("requests_waiting", len(self.waiting))
            self.cond.notify()

    def cancel(self, request_id: str) -> None:
        with self.cond:
            self.cancelled.add(request_id)
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def next_work(self) -> set[str] | None:
        """Wait until there is something to do; the requests cancelled since, or None when stopping."""
        with self.cond:
            while not self.stopping and not self.cancelled and not self.running and not self.waiting:
                self.cond.wait()
            cancelled, self.cancelled = self.cancelled, set()
            return None if self.stopping else cancelled

    def wait_if_stuck(self) -> None:
        """Nothing runs and nothing waiting fits (room held by busy sessions): wait a little for a change."""
        if not self.running and self.waiting and not self.cancelled:
            with self.cond:
                self.cond.wait(0.05)

    # --- admission ---------------------------------------------------------------------------------
    def drop_cancelled(self, ids: set[str]) -> None:
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
            for request in [r for r in group.admitted() if r.id in ids]:
                self.retire(group, request, "cancelled")

    def admit(self, prepare: Callable[[EngineRequest], None]) -> None:
        """First come, first served; only when nothing runs may a later request that fits pass a head
        that cannot (its room is held by a session whose next turn waits behind it). `prepare` readies
        a request's inputs (what may fail on bad input) before its row joins a batch."""
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
                prepare(request)
                self._join(request)
            except Exception as exc:  # noqa: BLE001 - a bad request must not stop the engine (it failed before joining)
                if request.session is not None:
                    self.sessions.unreserve(request.session)
                request.sink(Event("error", error=as_api_error(exc)))

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
            self.free_session(dropped)
        return True

    def _join(self, request: EngineRequest) -> None:
        """Add the request's row to the batch of its eviction setting (its session's parked row, if it continues one)."""
        parked = request.session.parked if request.session is not None and request.continues else None
        if request.session is not None and not request.solo:  # (a restart took its session over already)
            self.sessions.take(request.session.id)
            self.admission.unpark(request.session.id)
            if parked is None:
                self.store.release(request.session.parked)
        key = request.reservation.group
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Batch(key, self.new_cache(request.config), request.solo)
        if parked is not None and request.session.saved is not None:  # read back from the session store
            parked = self.session_files.place(request.session, self.pool, group.cache)
            self.metrics.inc("sessions_restored_total")
        group.cache.add_sequence(parked)
        group.requests.append(request)
        self.admission.admit(request.id, request.reservation)
        group.cache.set_views_limit(self.admission.group_view_bytes(key))

    def requeue(self, restarts: list[EngineRequest]) -> None:
        """Put restarted requests first in line, in their order."""
        self.metrics.inc("requests_restarted_total", len(restarts))
        with self.cond:
            self.waiting.extendleft(reversed(restarts))

    # --- the prefill budget ------------------------------------------------------------------------
    def sitting_out(self) -> set[str]:
        """The prefilling requests left out of this step: the others get their next chunk, oldest
        first, while the step's prefill budget lasts."""
        prefilling = sorted((r for r in self.running if r.prefilled < r.prompt_len), key=lambda r: r.arrival)
        budget, granted = self.max_prefill_tokens, set()
        for request in prefilling:
            start, end = request.next_chunk()
            if end - start <= budget:
                budget -= end - start
                granted.add(request.id)
        return {r.id for r in prefilling} - granted

    @staticmethod
    def sit_out(group: Batch, waiting: set[str]) -> None:
        """Park the rows that feed nothing this step out of the batch; bring back those that feed again."""
        for request in [r for r in group.requests if r.id in waiting]:
            parked = group.cache.park_sequence(group.requests.index(request))
            group.requests.remove(request)
            group.paused[request.id] = (request, parked)
        for request_id in [i for i in group.paused if i not in waiting]:
            request, parked = group.paused.pop(request_id)
            group.cache.add_sequence(parked)
            group.requests.append(request)

    # --- leaving -------------------------------------------------------------------------------------
    def retire(self, group: Batch, request: EngineRequest, reason: str | None) -> None:
        """Take a request out of its batch: park its session row or free its slots (the stepper tells the client)."""
        if request.id in group.paused:
            parked = group.paused.pop(request.id)[1]
        else:
            row = group.requests.index(request)
            group.requests.pop(row)
            parked = group.cache.park_sequence(row)
        self.admission.release(request.id)
        group.cache.set_views_limit(self.admission.group_view_bytes(group.key))
        self.drop_if_idle(group)
        if request.session_id is not None and reason in ("stop", "length"):
            keep_pending(parked.state, request.generated)  # the next turn feeds it first (submission.prompt_inputs)
            session = Session(request.session_id, config_key(request.config),
                              request.history + [canonical_reply(request.tracker.text)], parked)
            self.admission.park(session.id, parked.num_slots)
            if self.session_files is not None and self.session_files.write_through:  # every turn on disk (replicas)
                self.session_files.spill(session, self.pool, group.cache)
            for dropped in self.sessions.park(session):
                self.free_session(dropped)
        else:
            self.store.release(parked)
        if reason is not None:
            self.metrics.inc("requests_finished_total", label=("reason", reason))

    def free_session(self, session: Session) -> None:
        if self.session_files is not None:  # --session-store: spilled, resumed later without re-prefill
            group = self.groups.get(session.config_key)
            self.session_files.spill(session, self.pool, group.cache if group is not None else None)
            self.metrics.inc("sessions_spilled_total")
        self.admission.unpark(session.id)
        self.store.release(session.parked)

    def fail_all(self, error: APIError) -> None:
        with self.cond:
            waiting, self.waiting = list(self.waiting), deque()
        for request in waiting:
            if request.session is not None:
                self.sessions.unreserve(request.session)
            request.sink(Event("error", error=error))
        groups, self.groups = list(self.groups.values()), {}  # their caches may be mid-forward: drop them whole
        for group in groups:
            for request in group.admitted():
                self.admission.release(request.id)
                request.sink(Event("error", error=error))
        self.reclaim()

    def shutdown(self) -> None:
        self.fail_all(Unavailable(refusals.shutting_down()))
        if self.session_files is not None:  # --session-store: parked sessions outlive the server
            for session in self.sessions.drop_all():
                self.free_session(session)

    # --- batches -------------------------------------------------------------------------------------
    def new_cache(self, config: DBTrimKVConfig) -> DBTrimKVCache:
        cache = DBTrimKVCache(self.model, config)
        cache.use_pool(self.pool)
        return cache

    def drop_if_idle(self, group: Batch) -> None:
        """A solo batch goes away with its request (the shared batches of eviction settings stay)."""
        if group.solo and not group.requests and not group.paused:
            self.groups.pop(group.key, None)

    def reclaim(self) -> None:
        """Give the pool back every slot no batch row, parked row or session holds."""
        in_use = [g.cache.retained_slots(b) for g in self.groups.values() for b in range(len(g.cache.requests))]
        in_use += [parked.slots for g in self.groups.values() for _, parked in g.paused.values()]
        lost = self.store.reclaim(in_use + self.sessions.slot_ids())
        self.metrics.inc("kv_slots_reclaimed_total", lost)
