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
- The child's engine thread hands each event to an outbox; one sender thread ships whatever has
  gathered as one message, and a reader thread here hands each event to its request's sink.
- If the child dies, every request in flight gets a 503 error event and new ones are refused.

Only these two processes write what crosses the pipe (`pickle`; nothing a client sends or a file
holds is unpickled). Messages go as bytes pickled here, not through multiprocessing's own pickler:
torch registers with that one a reduction that moves every tensor through shared memory and a file
descriptor handed over a socket, which costs more than the tensors of a prompt are worth.
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

from ..errors import ConfigError
from ..inputs.prompts import tokenizer_of
from . import refusals
from .api_errors import APIError, InternalError, Unavailable
from .app import build_app
from .records import Event
from .replica_spec import ReplicaSpec
from .schema import ChatRequest
from .server import create_engine, server_limits, startup_report
from .submission import new_request_id, prompt_inputs, submit_chat

START_TIMEOUT_S = 1800.0  # loading a large model from a slow disk can take many minutes
CALL_TIMEOUT_S = 60.0
PREPARE_THREADS = 4  # session turns whose prompts the child builds at once


def launch_server(spec: ReplicaSpec, start_timeout: float = START_TIMEOUT_S):
    """The app and its engine process, whose model is loaded when this returns; ConfigError if the
    engine cannot be built as `spec` says (as `create_server` raises it)."""
    engine = EngineProcess(spec, start_timeout)
    return build_app(engine, server_limits(engine.processor, engine.config, spec.options), spec.options.http), engine


class EngineProcess:
    """The parent's handle on the engine process (see the module docstring)."""

    def __init__(self, spec: ReplicaSpec, start_timeout: float = START_TIMEOUT_S):
        context = multiprocessing.get_context("spawn")  # never fork a process that holds torch's threads
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_engine_main, args=(spec, child), name="dbtrimkv-engine", daemon=True)
        self._process.start()
        child.close()
        self._send_lock, self._lock = threading.Lock(), threading.Lock()
        self._sinks: dict[str, Callable[[Event], None]] = {}
        self._replies: dict[str, Future] = {}
        self._stopping = self._lost = False
        self.processor, self.config, self.report = self._await_ready(start_timeout)
        self.tokenizer = tokenizer_of(self.processor)
        self._reader = threading.Thread(target=self._read, name="dbtrimkv-engine-events", daemon=True)
        self._reader.start()

    @property
    def stopping(self) -> bool:
        return self._stopping or self._lost

    def start(self) -> None:
        """(The engine runs from the moment the process is ready.)"""

    def prepare(self, chat: ChatRequest, sink: Callable[[Event], None], max_prompt_tokens: int) -> tuple[str, dict]:
        """Submit a validated chat request; its id and the answer's extra fields, or the APIError refusing it."""
        if self.stopping:
            raise Unavailable(refusals.shutting_down())
        arrival, inputs = time.monotonic(), None
        if chat.session_id is None:
            inputs = prompt_inputs(self.processor, self.tokenizer, chat, max_prompt_tokens)
            chat = replace(chat, messages=[])  # built: its media need not travel
        job_id = new_request_id()
        with self._lock:
            self._sinks[job_id] = sink
        try:
            extra = self._call("prepare", job_id, chat, inputs, max_prompt_tokens, arrival).result()
        except BaseException:
            with self._lock:
                self._sinks.pop(job_id, None)
            raise
        return job_id, extra

    def cancel(self, request_id: str) -> None:
        self._post(("cancel", request_id))

    def count_rejection(self, status: int) -> None:
        self._post(("reject", status))

    def metrics_text(self) -> str:
        return self._call("metrics", uuid.uuid4().hex).result(CALL_TIMEOUT_S)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine (its parked sessions go to the session store, if any) and the process."""
        self._stopping = True
        self._post(("stop",))
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout)
        self._reader.join(timeout)

    # --- the pipe ----------------------------------------------------------------------------------
    def _await_ready(self, timeout: float):
        if not self._conn.poll(timeout):
            self._process.kill()
            raise RuntimeError(f"the engine process did not load the model within {timeout:g} s")
        try:
            message = _recv(self._conn)
        except (EOFError, OSError):
            self._process.join(5)
            raise RuntimeError(f"the engine process exited (code {self._process.exitcode}) while starting; "
                               "its error is above") from None
        if message[0] == "failed":
            self._process.join(5)
            _, config_error, text = message
            raise (ConfigError if config_error else RuntimeError)(text)
        return message[1:]

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                _send(self._conn, message)
        except (OSError, ValueError):  # the engine process is gone (ValueError: the pipe is closed here)
            raise Unavailable(self._gone()) from None

    def _post(self, message: tuple) -> None:
        """Send, with no answer awaited (nothing to do if the engine process is gone)."""
        try:
            self._send(message)
        except Unavailable:
            pass

    def _call(self, kind: str, key: str, *args) -> Future:
        future = Future()
        with self._lock:
            if self._lost:
                raise Unavailable(self._gone())
            self._replies[key] = future
        self._send((kind, key, *args))
        return future

    def _read(self) -> None:
        while True:
            try:
                batch = _recv(self._conn)
            except (EOFError, OSError):
                break
            for message in batch:
                self._dispatch(*message)
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
        error = Unavailable(self._gone())
        for future in replies.values():
            future.set_exception(error)
        for sink in sinks.values():
            sink(Event("error", error=error))

    def _gone(self) -> str:
        if self._stopping:
            return refusals.shutting_down()
        return (f"the engine process exited (code {self._process.exitcode}); this server answers no request "
                "until it is restarted")


def _send(conn, message) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn):
    return pickle.loads(conn.recv_bytes())


# --- the child ---------------------------------------------------------------------------------------
def _engine_main(spec: ReplicaSpec, conn) -> None:
    """The engine process: build the engine, then serve the parent's messages until "stop" or until the
    parent is gone. Ctrl-C reaches the parent, which stops this process in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        model, processor, config = spec.load()
        engine = create_engine(model, processor, config, spec.options)
        report = startup_report(engine)
    except Exception as exc:  # noqa: BLE001 - the parent raises it (a ConfigError as the same ConfigError)
        if not isinstance(exc, ConfigError):
            traceback.print_exc()
        _send(conn, ("failed", isinstance(exc, ConfigError), str(exc) or type(exc).__name__))
        conn.close()
        return
    engine.start()
    _send(conn, ("ready", processor, config, report))
    outbox = _Outbox(conn)
    prompts = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="dbtrimkv-prepare")
    try:
        while True:
            try:
                message = _recv(conn)
            except (EOFError, OSError):  # the HTTP process is gone
                break
            kind = message[0]
            if kind == "stop":
                break
            if kind == "prepare":
                prompts.submit(_prepare, engine, outbox, *message[1:])
            elif kind == "cancel":
                engine.cancel(message[1])
            elif kind == "reject":
                engine.count_rejection(message[1])
            elif kind == "metrics":
                outbox.put(("metrics", message[1], engine.metrics_text()))
    finally:
        prompts.shutdown(wait=True)
        engine.stop()
        outbox.close()


def _prepare(engine, outbox: _Outbox, job_id: str, chat: ChatRequest, inputs: dict | None, max_prompt_tokens: int,
             arrival: float) -> None:
    def sink(event: Event) -> None:
        outbox.put(("event", job_id, event))

    try:
        _, extra = submit_chat(engine, chat, sink, max_prompt_tokens, request_id=job_id, inputs=inputs,
                               arrival=arrival)
    except APIError as exc:
        outbox.put(("refused", job_id, exc))
    except Exception as exc:  # noqa: BLE001 - a bug: one clear 500, as the in-process server answers it
        traceback.print_exc()
        outbox.put(("refused", job_id, InternalError(f"the server failed on this request ({type(exc).__name__})")))
    else:
        outbox.put(("accepted", job_id, extra))


class _Outbox:
    """Messages for the HTTP process, sent by one thread: what gathers while a send runs goes as one
    (a step's tokens for all its rows travel together; the engine thread never waits on the pipe)."""

    def __init__(self, conn):
        self._conn, self._items, self._closed = conn, [], False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="dbtrimkv-outbox", daemon=True)
        self._thread.start()

    def put(self, message: tuple) -> None:
        with self._cond:
            self._items.append(message)
            if len(self._items) == 1:
                self._cond.notify()

    def close(self) -> None:
        """Send what is left, then close the pipe (the parent's reader sees the end)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        self._conn.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                batch, self._items = self._items, []
            if not batch:
                return
            try:
                _send(self._conn, batch)
            except OSError:  # the HTTP process is gone
                return
