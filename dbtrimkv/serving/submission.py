"""From a validated chat request to a submitted engine request: its session, its prompt, its refusals.

Why: the one place that turns a `ChatRequest` into an `EngineRequest`, whichever side of a process
boundary the HTTP layer sits on. `prompt_inputs` builds the prompt's tokens (the processor: image
decoding, chat template) and refuses a prompt that is too long; it needs the engine only for a turn
that continues a session (only the new messages are built, after the reply's pending token). So
with the engine in a process of its own (`engine_process.py`), the HTTP process builds every
session-free prompt itself, on its own core, and `submit_chat` runs beside the engine.
"""

from __future__ import annotations

import uuid

from ..errors import DBTrimKVError
from ..inputs.prompts import build_inputs
from ..inputs.turns import closing_ids, prepend_tokens
from ..runner.pending import pending_ids
from . import refusals
from .api_errors import BadRequest, Conflict, TooLarge
from .records import EngineRequest, config_key
from .request_bounds import check_text_tokens
from .schema import ChatRequest
from .sessions import Session, SessionBusy


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def prompt_inputs(processor, tokenizer, chat: ChatRequest, max_prompt_tokens: int, session: Session | None = None,
                  stop_ids=()) -> dict:
    """The processor outputs of the request's new messages (all of them, or those past the continued
    `session`'s history, after its pending token and the turn's closing tokens)."""
    new_messages = chat.messages[len(session.history):] if session is not None else chat.messages
    check_text_tokens(tokenizer, [p["text"] for m in new_messages for p in m["content"] if p["type"] == "text"],
                      max_prompt_tokens)
    try:
        inputs = build_inputs(processor, new_messages)
        if session is not None:
            pending = pending_ids(session.parked.state)  # the reply's last token was never fed
            inputs = prepend_tokens(inputs, pending + closing_ids(tokenizer, pending, stop_ids))
    except (DBTrimKVError, ValueError) as exc:
        raise BadRequest(str(exc), param="messages") from None
    if int(inputs["input_ids"].shape[1]) > max_prompt_tokens:
        raise TooLarge(refusals.prompt_too_long(max_prompt_tokens), param="messages")
    return inputs


def submit_chat(engine, chat: ChatRequest, sink, max_prompt_tokens: int, request_id: str | None = None,
                inputs: dict | None = None, arrival: float | None = None) -> tuple[EngineRequest, dict]:
    """Claim the request's session, build its prompt (unless `inputs`, built by the caller for a request
    without a session, are given), submit it to `engine`; returns it and the response's extra fields.
    `arrival` (time.monotonic(), default now): when its prompt was built, where the caller built it."""
    session, continues, notice = None, False, None
    if chat.session_id is not None:
        try:
            session, continues, notice = engine.sessions.claim(chat.session_id, config_key(chat.config), chat.canonical)
        except SessionBusy as exc:
            raise Conflict(str(exc), param="session_id") from None
    try:
        if inputs is None or session is not None:
            inputs = prompt_inputs(engine.processor, engine.tokenizer, chat, max_prompt_tokens,
                                   session if continues else None, engine.stop_ids)
        job = EngineRequest(request_id or new_request_id(), inputs, chat.config, chat.sampling, sink,
                            send_every=engine.stream_interval if chat.stream else None,  # not streamed: at the end
                            session_id=chat.session_id, session=session, continues=continues, history=chat.canonical,
                            **({} if arrival is None else {"arrival": arrival}))
        engine.submit(job)
    except BaseException:
        if session is not None:
            engine.sessions.unreserve(session)
        raise
    extra = {}
    if chat.session_id is not None:
        extra["session_id"] = chat.session_id
    if notice:
        extra["notice"] = notice
    return job, extra
