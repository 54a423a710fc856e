"""The OpenAI chat-completions request: validated, with every refusal naming the field at fault.

Why: a malformed request must get a 400 that says what is wrong (field, value, allowed range)
before it costs the engine anything. `parse_chat_request` turns the JSON body into a
`ChatRequest`: sampling settings, eviction settings capped by the server's, an optional session,
and the messages in dbtrimkv's chat format (media decoded by `media_sources`) plus a canonical,
comparable form of them (media replaced by a digest) that sessions match new turns against.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..inputs.prompts import ROLES
from ..runner.sampling import InvalidSampling, SamplingParams
from ..settings.config import DBTrimKVConfig
from . import refusals
from .api_errors import BadRequest, ModelNotFound
from .media_sources import MediaPolicy, load_image_url, load_video_url
from .request_bounds import MediaBudget

# OpenAI fields this server cannot honour: refused (400 naming the field) unless absent, null or this value
UNSUPPORTED = {"tools": ("tool calls", ()), "tool_choice": ("tool calls", "none"),
               "functions": ("function calls", ()), "function_call": ("function calls", "none"),
               "logit_bias": ("logit_bias", {}), "audio": ("audio output", {}), "logprobs": ("logprobs", False),
               "top_logprobs": ("logprobs", 0), "n": ("n > 1", 1), "presence_penalty": ("presence_penalty", 0),
               "frequency_penalty": ("frequency_penalty", 0), "response_format": ("response_format other than text",
                                                                                  {"type": "text"}),
               "modalities": ("output modalities other than text", ["text"]), "prediction": ("predicted outputs", {}),
               "reasoning_effort": ("reasoning_effort", ()), "web_search_options": ("web search", {})}
# accepted, and change nothing here (bookkeeping fields of OpenAI's API)
IGNORED = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
           "parallel_tool_calls")
KNOWN = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
         "stream_options", "session_id", "eviction", "ignore_eos") + IGNORED + tuple(UNSUPPORTED)
EVICTION_FIELDS = ("policy", "budget", "memory_size", "threshold")


@dataclass(frozen=True)
class ServerLimits:
    model_name: str
    config: DBTrimKVConfig  # the server's eviction settings (a request's budget is capped by the scheduler)
    max_tokens: int = 4096  # cap on max_tokens
    default_max_tokens: int = 256
    media: MediaPolicy = field(default_factory=MediaPolicy)


@dataclass
class ChatRequest:
    messages: list[dict]  # dbtrimkv chat format, media loaded
    canonical: list[tuple]  # comparable form of the OpenAI messages
    sampling: SamplingParams
    config: DBTrimKVConfig
    stream: bool = False
    include_usage: bool = False
    session_id: str | None = None


def parse_chat_request(body, limits: ServerLimits) -> ChatRequest:
    """The request, or the first problem as an `APIError` naming its field. `model` is required (as
    OpenAI's API requires it); fields this server cannot honour are refused, not ignored."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - set(KNOWN))
    if unknown:
        raise BadRequest(f"unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    for name, (what, default) in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value != default and not (isinstance(default, tuple) and value in ([], {})):
            raise BadRequest(f"{what} not supported by this server ({name}={refusals.short(value)})", param=name)
    model = body.get("model")
    if model is None:
        raise BadRequest(f"'model' is required (this server serves {limits.model_name!r})", param="model")
    if model != limits.model_name:
        raise ModelNotFound(refusals.model_not_found(model, limits.model_name), param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", param="messages")
    canonical = [_canonical(m, f"messages[{i}]") for i, m in enumerate(messages)]
    if canonical[-1][0] != "user":
        raise BadRequest("the last message must come from the user", param=f"messages[{len(messages) - 1}].role")
    stream = _bool(body, "stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", param="stream_options")
    session_id = body.get("session_id")
    if session_id is not None and (not isinstance(session_id, str) or not 0 < len(session_id) <= 128):
        raise BadRequest("'session_id' must be a string of 1 to 128 characters", param="session_id")
    budget = limits.media.budget()
    return ChatRequest(
        messages=[_dbtrimkv_message(m, f"messages[{i}]", limits.media, budget) for i, m in enumerate(messages)],
        canonical=canonical, sampling=_sampling(body, limits), config=_eviction(body.get("eviction"), limits),
        stream=stream, include_usage=_bool(options, "include_usage", False, "stream_options.include_usage"),
        session_id=session_id,
    )


def _bool(body: dict, name: str, default: bool, param: str | None = None) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"'{param or name}' must be true or false, got {value!r}", param=param or name)
    return value


def _sampling(body: dict, limits: ServerLimits) -> SamplingParams:
    """Sampling settings; `SamplingParams` owns what is valid (finite, in range), this adds the server's cap."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a non-empty string or a list of up to 4 non-empty strings", param="stop")
    given = {key: body[key] for key in ("temperature", "top_p", "seed") if body.get(key) is not None}
    try:
        params = SamplingParams(max_tokens=_given(body, name, limits.default_max_tokens), stop=tuple(stop),
                                ignore_eos=_bool(body, "ignore_eos", False), **given)
    except InvalidSampling as exc:
        field = name if exc.field == "max_tokens" else exc.field
        raise BadRequest(str(exc).replace("'max_tokens'", f"'{field}'"), param=field) from None
    if params.max_tokens > limits.max_tokens:
        raise BadRequest(f"'{name}' must be at most this server's --max-tokens {limits.max_tokens}, got "
                         f"{params.max_tokens}", param=name)
    return params


def _given(body: dict, name: str, default):
    value = body.get(name)
    return default if value is None else value


def _eviction(value, limits: ServerLimits) -> DBTrimKVConfig:
    """The server's eviction settings with the request's `eviction` overrides. Its budget is resolved
    once, when the scheduler takes the request (`scheduler.Limits.request_budget`: the server's
    budget caps it)."""
    if value is None:
        return limits.config
    if not isinstance(value, dict):
        raise BadRequest("'eviction' must be an object with policy, budget, memory_size or threshold", param="eviction")
    unknown = sorted(set(value) - set(EVICTION_FIELDS))
    if unknown:
        raise BadRequest(f"unknown eviction setting(s) {', '.join(unknown)}; known: {', '.join(EVICTION_FIELDS)}",
                         param="eviction")
    changes = dict(value)
    if changes.get("policy", limits.config.policy) != "threshold":
        changes.setdefault("threshold", None)
    try:
        return limits.config.replace(**changes)
    except (ConfigError, TypeError) as exc:
        raise BadRequest(f"eviction: {exc}", param="eviction") from None


def _content_parts(message: dict, where: str) -> list[dict]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if content is None and message.get("role") == "assistant":
        return []
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("text", "image_url", "video_url"):
            raise BadRequest(f"{where}.content[{j}] must be a part of type text, image_url or video_url",
                             param=f"{where}.content[{j}]")
        key = part["type"]
        value = part.get(key)
        if key == "text" and not isinstance(value, str):
            raise BadRequest(f"{where}.content[{j}].text must be a string", param=f"{where}.content[{j}].text")
        if key != "text" and not isinstance(value, (str, dict)):
            raise BadRequest(f"{where}.content[{j}].{key} must be {{'url': ...}}", param=f"{where}.content[{j}].{key}")
    return content


def _url(part: dict) -> str:
    value = part[part["type"]]
    return value.get("url") if isinstance(value, dict) else value


def _canonical(message, where: str) -> tuple:
    if not isinstance(message, dict):
        raise BadRequest(f"{where} must be an object with 'role' and 'content'", param=where)
    role = message.get("role")
    if role not in ROLES:
        raise BadRequest(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role")
    parts = []
    for part in _content_parts(message, where):
        if part["type"] == "text":
            parts.append(("text", part["text"]))
        else:
            url = _url(part)
            digest = hashlib.sha256(url.encode() if isinstance(url, str) else b"").hexdigest()
            parts.append((part["type"], digest))
    return role, tuple(parts)


def canonical_reply(text: str) -> tuple:
    return "assistant", (("text", text),)


def _dbtrimkv_message(message: dict, where: str, media: MediaPolicy, budget: MediaBudget) -> dict:
    parts = []
    for j, part in enumerate(_content_parts(message, where)):
        at = f"{where}.content[{j}]"
        if part["type"] == "text":
            parts.append({"type": "text", "text": part["text"]})
        elif part["type"] == "image_url":
            parts.append({"type": "image", "image": load_image_url(_url(part), media, at, budget)})
        else:
            parts.append({"type": "video", "video": load_video_url(_url(part), media, at, budget)})
    return {"role": message["role"], "content": parts}
