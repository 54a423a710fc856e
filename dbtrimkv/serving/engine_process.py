"""The engine in a process of its own (`dbtrimkv serve --engine-process`): the HTTP layer and the
processor on one core, the model on another.

Why: in one process the HTTP layer (parsing, the processor's image decoding and chat template,
server-sent events) and the engine thread share one interpreter lock, so every request's front-end
work stalls the model's steps; with a small model on CPU most of a step is Python. As vLLM runs
its engine core apart from its API server, `EngineProcess` starts the engine in a spawned child
and offers the HTTP layer (`app.build_app`) the calls of an in-process `Engine`: `prepare`,
`cancel`, `count_rejection`, `metrics_text`, `stopping`, `start`, `stop`.

- `prepare` builds a session-free request's prompt in this process (`submission.prompt_inputs`)
  and sends it; a turn of a session is built beside the engine, whose parked state its prompt
  depends on. The child answers "accepted" (the response's extra fields) or the `APIError` that
  refuses the request, which `prepare` raises as the in-process call would.
- Each side sends through an outbox of its own (`pipe.Outbox`): one thread ships whatever has gathered
  as one message (a step's events for all rows travel together; the engine thread and the event
  loop never wait on the pipe); a reader thread here hands each event to its request's sink. A
  client that goes away is cancelled there and forgotten here.
- A message that fails (one that does not pickle, a bug while handling it) fails its request alone,
  with a 500. If the child dies, every request in flight gets a 503 error event, new ones are
  refused, and the server says so on stderr. Signals go to the parent, which stops the child in
  order (its parked sessions reach the session store).

The pipe and how messages cross it: `pipe.py`; the child's side: `engine_worker.py`.
"""

from __future__ import annotations

import multiprocessing
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace

from ..inputs.prompts import tokenizer_of
from . import refusals
from .api_errors import APIError, InternalError, Unavailable
from .app import build_app
from .engine_worker import engine_main
from .pipe import Outbox, recv
from .records import Event
from .replica_spec import ReplicaSpec
from .schema import ChatRequest
from .server import server_limits
from .submission import new_request_id, prompt_inputs

START_TIMEOUT_S = 1800.0  # loading a large model from a slow disk can take many minutes
METRICS_TIMEOUT_S = 60.0
PREPARE_TIMEOUT_S = 900.0  # a backstop: a session's turn has its prompt (its media) built in the child
STOP_TIMEOUT_S = 60.0  # the child writes its parked sessions to the session store before it exits


def launch_server(spec: ReplicaSpec, start_timeout: float = START_TIMEOUT_S):
    """The app and its engine process, whose model is loaded when this returns; the `DBTrimKVError`
    (e.g. ConfigError) the engine process met building the engine, as `create_server` raises it."""
    engine = EngineProcess(spec, start_timeout)
    try:
        limits = server_limits(engine.processor, engine.config, spec.options)
    except BaseException:
        engine.stop()
        raise
    return build_app(engine, limits, spec.options.http), engine


class EngineProcess:
    """The parent's handle on the engine process (see the module docstring). The engine process
    is a daemon (stopped with its parent), so the engine cannot start processes of its own."""

    def __init__(self, spec: ReplicaSpec, start_timeout: float = START_TIMEOUT_S):
        context = multiprocessing.get_context("spawn")  # never fork a process that holds torch's threads
        self._conn, child = context.Pipe()
        self._process = context.Process(target=engine_main, args=(spec, child), name="dbtrimkv-engine", daemon=True)
        self._process.start()
        child.close()
        self._lock = threading.Lock()
        self._sinks: dict[str, Callable[[Event], None]] = {}
        self._replies: dict[str, Future] = {}
        self._stopping = self._lost = False
        try:
            self.processor, self.config, self.report = self._await_ready(start_timeout)
        except BaseException:
            self._end_process(5.0)
            self._conn.close()
            raise
        self.tokenizer = tokenizer_of(self.processor)
        self._outbox = Outbox(self._conn, "dbtrimkv-engine-requests", self._unsendable)
        self._reader = threading.Thread(target=self._read, name="dbtrimkv-engine-events", daemon=True)
        self._reader.start()

    @property
    def stopping(self) -> bool:
        return self._stopping or self._lost

    def unavailable(self) -> str | None:
        """Why this engine takes no request now (None: it does): shutting down, or its process exited."""
        return self._gone() if self.stopping else None

    def start(self) -> None:
        """(The engine runs from the moment the process is ready.)"""

    def prepare(self, chat: ChatRequest, sink: Callable[[Event], None], max_prompt_tokens: int) -> tuple[str, dict]:
        """Submit a validated chat request; its id and the answer's extra fields, or the APIError refusing it."""
        if self.stopping:
            raise Unavailable(self._gone())
        inputs = None
        if chat.session_id is None:
            inputs = prompt_inputs(self.processor, self.tokenizer, chat, max_prompt_tokens)
            chat = replace(chat, messages=[])  # built: its media need not travel
        arrival = time.monotonic()  # (as in process: the request arrives at the engine once its prompt is built)
        job_id = new_request_id()
        with self._lock:
            self._sinks[job_id] = sink
        try:
            return job_id, self._call("prepare", job_id, chat, inputs, max_prompt_tokens, arrival).result(PREPARE_TIMEOUT_S)
        except APIError:  # refused: the engine never took it
            with self._lock:
                self._sinks.pop(job_id, None)
            raise
        except BaseException:  # e.g. no answer in time: the engine may hold it
            self.cancel(job_id)
            raise
        finally:
            with self._lock:
                self._replies.pop(job_id, None)

    def cancel(self, request_id: str) -> None:
        """The client went away: no more events for it; the engine frees its slots at the next token boundary."""
        with self._lock:
            self._sinks.pop(request_id, None)
        self._outbox.put(("cancel", request_id))

    def count_rejection(self, status: int) -> None:
        self._outbox.put(("reject", status))

    def metrics_text(self) -> str:
        key = uuid.uuid4().hex
        try:
            return self._call("metrics", key).result(METRICS_TIMEOUT_S)
        finally:
            with self._lock:
                self._replies.pop(key, None)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the engine (its parked sessions go to the session store, if any) and the process."""
        if self._conn.closed:
            return
        self._stopping = True
        self._outbox.put(("stop",))
        self._outbox.close()
        self._end_process(timeout)
        self._reader.join(timeout)
        self._conn.close()

    # --- the pipe ----------------------------------------------------------------------------------
    def _await_ready(self, timeout: float):
        if not self._conn.poll(timeout):
            raise RuntimeError(f"the engine process did not load the model within {timeout:g} s")
        try:
            message = recv(self._conn)
        except (EOFError, OSError):
            self._process.join(5)
            raise RuntimeError(f"the engine process exited (code {self._process.exitcode}) while starting; "
                               "its error is above") from None
        if message[0] == "failed":
            _, error, text = message
            raise error if error is not None else RuntimeError(text)
        return message[1:]

    def _end_process(self, timeout: float) -> None:
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout)

    def _call(self, kind: str, key: str, *args) -> Future:
        future = Future()
        with self._lock:
            if self._lost:
                raise Unavailable(self._gone())
            self._replies[key] = future
        self._outbox.put((kind, key, *args))
        return future

    def _unsendable(self, message: tuple, exc: Exception) -> None:
        """A request that cannot be pickled for the engine process fails alone (a bug: one clear 500)."""
        with self._lock:
            future = self._replies.pop(message[1], None) if len(message) > 1 else None
        if future is not None:
            future.set_exception(InternalError(f"the request could not be handed to the engine process "
                                               f"({type(exc).__name__})"))

    def _read(self) -> None:
        try:
            while True:
                try:
                    batch = recv(self._conn)
                except (EOFError, OSError):
                    break
                for message in batch:
                    try:
                        self._dispatch(*message)
                    except Exception:  # noqa: BLE001 - one message's sink failing must not stop the others
                        traceback.print_exc()
        except Exception:  # noqa: BLE001 - e.g. a message that does not unpickle: the engine is unreachable
            traceback.print_exc()
            self._process.kill()
        finally:
            self._fail_everything()

    def _dispatch(self, kind: str, key: str, payload) -> None:
        if kind == "event":
            with self._lock:
                sink = self._sinks.pop(key, None) if payload.kind in ("done", "error") else self._sinks.get(key)
            if sink is not None:
                sink(payload)
            return
        with self._lock:
            future = self._replies.pop(key, None)
        if future is None:
            return
        if kind == "refused":
            future.set_exception(payload)
        else:
            future.set_result(payload)

    def _fail_everything(self) -> None:
        """The engine process is gone: what waits on it fails now, with one 503 naming why."""
        with self._lock:
            self._lost = True
            sinks, replies, self._sinks, self._replies = self._sinks, self._replies, {}, {}
        self._process.join(1.0)
        if not self._stopping:
            print(f"dbtrimkv: error: {self._gone()}", file=sys.stderr)
        error = Unavailable(self._gone())
        for future in replies.values():
            future.set_exception(error)
        for sink in sinks.values():
            sink(Event("error", error=error))

    def _gone(self) -> str:
        if self._stopping:
            return refusals.shutting_down()
        return refusals.engine_exited(self._process.exitcode)
