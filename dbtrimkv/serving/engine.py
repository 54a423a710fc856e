"""The engine loop: continuous batching of chat requests inside one bounded KV memory.

Why: one thread owns the model, the pool and the views. At every token boundary (one engine step)
it drops cancelled requests (their slots return to the pool at once), admits waiting requests whose
bound and views fit, and runs one step: the scheduler (`scheduler.py`) owns the queue, admission, the
prefill budget per step (`--max-prefill-tokens-per-step`) and the parked sessions; the stepper
(`stepper.py`) feeds every running row, samples and answers; the records they share are in
`records.py`. This module sizes the pool, builds the two and runs the thread.

Results go back through each request's `sink` (called from this thread; the HTTP layer hands
them to its event loop). A failure while serving one request fails that request alone (`stepper.py`).
`steps` records, per engine step, the prompt and decode tokens fed and the
pool and view bytes held (bounded; tests and the benchmark read it).
"""

from __future__ import annotations

import threading
import traceback
from collections import deque

import torch

from ..cache import SlotPool
from ..cache.cache import uses_views
from ..settings.config import DBTrimKVConfig
from ..errors import ConfigError
from ..modeling.gates import text_config_of
from ..inputs.turns import stop_token_ids
from ..inputs.prompts import tokenizer_of
from . import refusals
from .admission import Admission, server_budget, split_memory, view_columns
from .api_errors import InternalError
from .metrics import Metrics
from .records import EngineRequest, StepRecord
from .schema import ChatRequest
from .stepper import Stepper
from .scheduler import Limits, Scheduler
from .sessions import SessionStore
from .submission import submit_chat

MAX_STEP_RECORDS = 100_000


class Engine:
    """One replica's engine: sizes the pool, builds the scheduler and the stepper, runs the thread."""

    def __init__(self, model, processor, config: DBTrimKVConfig, kv_memory: int, max_running: int = 16,
                 max_queue: int = 64, max_sessions: int = 64, max_prefill_tokens: int | None = None,
                 metrics: Metrics | None = None, stream_interval: int = 1):
        """`kv_memory` bytes pay for the pool and (on CPU) the attention views; a step feeds at most
        `max_prefill_tokens` prompt tokens (default: max(2048, the prefill chunk)); a streamed answer's
        text goes out every `stream_interval` tokens (the first token's at once)."""
        text = text_config_of(model)
        self.model, self.processor, self.config = model, processor, config
        self.tokenizer = tokenizer_of(processor)
        self.stop_ids = stop_token_ids(model, self.tokenizer)
        self.num_layers, self.num_kv_heads = text.num_hidden_layers, text.num_key_value_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        param = next(model.parameters())
        self.budget = server_budget(config, self.num_layers, self.num_kv_heads)  # resolved once per server
        self.max_prefill_tokens = max(2048, config.prefill_chunk) if max_prefill_tokens is None else max_prefill_tokens
        if self.max_prefill_tokens < config.prefill_chunk:
            raise ConfigError(refusals.chunk_over_step_budget(config.prefill_chunk, self.max_prefill_tokens))
        self.kv_memory = int(kv_memory)
        views = uses_views(torch.empty(0, dtype=param.dtype, device=param.device))
        self.limits = Limits(self.num_layers, self.num_kv_heads, head_dim, param.dtype, views, self.budget)
        self.slot_bytes, self.row_view_bytes = self.limits.slot_bytes, self.limits.row_view_bytes
        self.bound_for = self.limits.bound_for
        bound = self.bound_for(self.budget, config, config.prefill_chunk)
        default_views = (self.row_view_bytes(view_columns(bound, self.limits.segments, bound, config.buffer_size))
                         if views else 0)
        pool_slots, view_bytes = split_memory(self.kv_memory, self.slot_bytes, bound, default_views)
        self.pool = SlotPool(head_dim, param.dtype, param.device)
        if pool_slots:
            self.pool.ensure_free(pool_slots, limit=pool_slots)  # allocated once; it never grows
        self.admission = Admission(pool_slots, view_bytes, self.row_view_bytes)
        self.sessions = SessionStore(max_sessions)
        self.metrics = metrics or Metrics()
        self.max_running, self.max_queue = max_running, max_queue
        if isinstance(stream_interval, bool) or not isinstance(stream_interval, int) or stream_interval < 1:
            raise ConfigError(refusals.bad_stream_interval(stream_interval))
        self.stream_interval = stream_interval
        self.scheduler = Scheduler(model, self.limits, self.pool, self.admission, self.sessions, self.metrics,
                                   max_running, max_queue, self.max_prefill_tokens)
        self.stepper = Stepper(model, self.tokenizer, self.stop_ids, self.scheduler,
                             self.metrics, self.kv_memory)
        self.steps: deque[StepRecord] = deque(maxlen=MAX_STEP_RECORDS)
        self._thread: threading.Thread | None = None
        self._evictions = (0, 0)
        self.metrics.set("kv_memory_bytes", self.kv_memory)
        self.metrics.set("kv_pool_slots", pool_slots)
        self.metrics.set("kv_pool_bytes", self.pool_bytes)
        self.metrics.set("kv_views_limit_bytes", view_bytes)
        self.metrics.set("kv_request_bound_slots", bound)
        self.metrics.set("kv_request_views_bytes", default_views)
        self.metrics.set("max_prefill_tokens_per_step", self.max_prefill_tokens)

    # --- the scheduler's state, read by the server and the tests -------------------------------
    @property
    def session_files(self):
        """session_store.SessionFiles (--session-store), set by create_server."""
        return self.scheduler.session_files

    @session_files.setter
    def session_files(self, files) -> None:
        self.scheduler.session_files = files

    @property
    def cond(self) -> threading.Condition:
        return self.scheduler.cond

    @property
    def waiting(self) -> deque[EngineRequest]:
        return self.scheduler.waiting

    @property
    def stopping(self) -> bool:
        return self.scheduler.stopping

    def unavailable(self) -> str | None:
        """Why this engine takes no request now (None: it does)."""
        return refusals.shutting_down() if self.stopping else None

    @property
    def groups(self) -> dict:
        return self.scheduler.groups

    @property
    def running(self) -> list[EngineRequest]:
        """Admitted requests: the rows of every batch and those sitting out this step."""
        return self.scheduler.running

    @property
    def slots_in_use(self) -> int:
        return self.pool.capacity - self.pool.num_free

    @property
    def pool_bytes(self) -> int:
        """Bytes of the pool (allocated once)."""
        return self.scheduler.pool_bytes

    def views_bytes(self) -> int:
        """Bytes the attention views hold now, over all batches."""
        return self.scheduler.views_bytes()

    # --- called from other threads -----------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (once: a started engine is left as it is)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dbtrimkv-engine", daemon=True)
            self._thread.start()

    def submit(self, request: EngineRequest) -> None:
        """Hand a new request to the scheduler (admission: `Scheduler.submit`)."""
        self.scheduler.submit(request)

    def cancel(self, request_id: str) -> None:
        """The client went away: free the request's slots at the next token boundary."""
        self.scheduler.cancel(request_id)

    def prepare(self, chat: ChatRequest, sink, max_prompt_tokens: int) -> tuple[str, dict]:
        """Submit a validated chat request (`submission.submit_chat`); its id and the answer's extra fields.
        The HTTP layer's calls (`prepare`, `cancel`, `count_rejection`, `metrics_text`, `stopping`, `start`,
        `stop`) are the same on an `EngineProcess`."""
        job, extra = submit_chat(self, chat, sink, max_prompt_tokens)
        return job.id, extra

    def count_rejection(self, status: int) -> None:
        self.metrics.inc("requests_rejected_total", label=("status", str(status)))

    def metrics_text(self) -> str:
        """The Prometheus text of the metrics, gauges read now."""
        self.live_gauges()
        return self.metrics.render()

    def stop(self, timeout: float = 10.0) -> None:
        self.scheduler.stop()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            cancelled = self.scheduler.next_work()
            if cancelled is None:
                break
            try:
                self.scheduler.drop_cancelled(cancelled)
                self.scheduler.admit(self.stepper.prepare)
                self._record(self.stepper.run_step())
                self._update_gauges()
            except Exception as exc:  # noqa: BLE001 - a bug must fail requests, not hang every client
                traceback.print_exc()
                self.scheduler.fail_all(InternalError(f"the engine failed: {type(exc).__name__}: {exc}"))
            self.scheduler.wait_if_stuck()
        self.scheduler.shutdown()

    def _record(self, record: StepRecord) -> None:
        if record.prefill_tokens or record.decode_tokens:
            self.steps.append(record)
            self.metrics.observe("step_prefill_tokens", record.prefill_tokens)
            self.metrics.set("step_prefill_tokens_peak", max(self.metrics.get("step_prefill_tokens_peak"),
                                                             record.prefill_tokens))
            self.metrics.set("kv_views_bytes_peak", max(self.metrics.get("kv_views_bytes_peak"), record.views_bytes))

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
        groups = self.groups.values()
        evictions = sum(g.cache.num_evictions for g in groups)
        evicted = sum(g.cache.evicted_entries for g in groups)
        m.inc("evictions_total", evictions - self._evictions[0])
        m.inc("evicted_entries_total", evicted - self._evictions[1])
        self._evictions = (evictions, evicted)
        m.set("kv_views_skipped_total", sum(g.cache.views_skipped for g in groups))
        if self.pool.capacity != self.admission.pool_slots:
            raise RuntimeError("the KV pool grew past its start-up size; admission control is broken")
