"""The engine process's side of `dbtrimkv serve --engine-process` (the parent's: `engine_process.py`).

Why: the child builds the engine from the `ReplicaSpec` (the model is loaded here, not in the HTTP
process), answers "ready" with what the HTTP layer needs (the processor, the resolved settings, the
start-up report) or the error that stopped it, then serves the parent's messages: a request to
submit (a session's turn has its prompt built here, in a small pool of threads, beside its parked
state), a cancellation, a rejection to count, a metrics scrape, and "stop".
"""

from __future__ import annotations

import pickle
import signal
import traceback
from concurrent.futures import ThreadPoolExecutor

from ..errors import DBTrimKVError
from .api_errors import APIError, InternalError, server_failure
from .pipe import Outbox, dumps, recv
from .records import Event
from .replica_spec import ReplicaSpec
from .schema import ChatRequest
from .server import create_engine, startup_report
from .submission import submit_chat

PREPARE_THREADS = 4  # session turns whose prompts the child builds at once


def engine_main(spec: ReplicaSpec, conn) -> None:
    """The engine process: build the engine, then serve the parent's messages until "stop" or until the
    parent is gone. Signals go to the parent (Ctrl-C, a supervisor's SIGTERM to the process group),
    which stops this process in order: its parked sessions reach the session store."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        model, processor, config = spec.load()
        engine = create_engine(model, processor, config, spec.options)
        report = startup_report(engine)
    except Exception as exc:  # noqa: BLE001 - the parent raises it: a DBTrimKVError as itself
        if not isinstance(exc, DBTrimKVError):
            traceback.print_exc()
        conn.send_bytes(dumps(("failed", _portable(exc), str(exc) or type(exc).__name__)))
        conn.close()
        return
    engine.start()
    conn.send_bytes(dumps(("ready", processor, config, report)))
    outbox: Outbox

    def unsendable(message: tuple, exc: Exception) -> None:  # an answer that does not pickle: its request fails
        kind, key = message[0], message[1]
        error = InternalError(f"the engine's answer could not be sent to the server ({type(exc).__name__})")
        outbox.put(("event", key, Event("error", error=error)) if kind == "event" else ("refused", key, error))

    outbox = Outbox(conn, "dbtrimkv-engine-outbox", unsendable)
    prompts = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="dbtrimkv-prepare")
    try:
        while True:
            try:
                batch = recv(conn)
            except (EOFError, OSError):  # the HTTP process is gone
                break
            if not _serve(engine, outbox, prompts, batch):
                break
    finally:
        prompts.shutdown(wait=True)
        engine.stop()
        outbox.close()
        conn.close()


def _portable(exc: Exception) -> Exception | None:
    """`exc` itself if the parent can raise it as it is (a DBTrimKVError that pickles), else None."""
    if not isinstance(exc, DBTrimKVError):
        return None
    try:
        return pickle.loads(dumps(exc))
    except Exception:  # noqa: BLE001 - the parent raises its text instead
        return None


def _serve(engine, outbox: Outbox, prompts: ThreadPoolExecutor, batch: list[tuple]) -> bool:
    """Handle the parent's messages; False at "stop". A message that fails fails its request alone."""
    for message in batch:
        kind = message[0]
        if kind == "stop":
            return False
        try:
            if kind == "prepare":
                job_id, chat, inputs, max_prompt_tokens, arrival = message[1:]
                if inputs is None:  # a session's turn: its prompt is built here, beside the others' steps
                    prompts.submit(_prepare, engine, outbox, job_id, chat, inputs, max_prompt_tokens, arrival)
                else:
                    _prepare(engine, outbox, job_id, chat, inputs, max_prompt_tokens, arrival)
            elif kind == "cancel":
                engine.cancel(message[1])
            elif kind == "reject":
                engine.count_rejection(message[1])
            elif kind == "metrics":
                outbox.put(("metrics", message[1], engine.metrics_text()))
        except Exception as exc:  # noqa: BLE001 - one clear 500 for its request; the engine goes on
            traceback.print_exc()
            if kind in ("prepare", "metrics"):
                outbox.put(("refused", message[1], server_failure(exc)))
    return True


def _prepare(engine, outbox: Outbox, job_id: str, chat: ChatRequest, inputs: dict | None, max_prompt_tokens: int,
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
        outbox.put(("refused", job_id, server_failure(exc)))
    else:
        outbox.put(("accepted", job_id, extra))
