"""lmms-eval requests in the pipeline's terms: chat messages, generation settings, stop strings.

Why: lmms-eval hands a chat model `doc_to_messages(doc)`, messages whose parts are
`{"type": "image" | "video" | "text", "url" | "text": ...}`, and a `gen_kwargs` dict
(`until`, `max_new_tokens`, `temperature`, ...). `DBTrimKVPipeline` speaks its own chat format and
keywords; this module is the one translation between the two, free of lmms-eval imports so the
main test suite checks it without the extra installed.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import PromptError

DEFAULT_MAX_NEW_TOKENS = 128  # lmms-eval's own default when a task names none


def to_pipeline_messages(messages, system_prompt: str | None = None) -> list[dict]:
    """lmms-eval chat messages (dicts, or its pydantic `ChatMessage`s) as a dbtrimkv chat.

    An image is a PIL image or a path; a video a path (decoded at the model's `fps` / `max_frames`)
    or a list of frames (images or paths, taken as sampled at the model's `fps`); a video part's own
    `fps` / `max_frames` keys, where a task gives them, win over the model's."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptError(f"doc_to_messages must return a non-empty list of messages, got {type(messages).__name__}")
    chat = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt else []
    for message in messages:
        message = message.model_dump() if hasattr(message, "model_dump") else message
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise PromptError(f"each message needs 'role' and 'content', got {message!r:.80}")
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else [_part(p) for p in content]
        chat.append({"role": message["role"], "content": parts})
    return chat


def _part(part) -> dict:
    part = part.model_dump() if hasattr(part, "model_dump") else part
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return {"type": "text", "text": part["text"]}
    if kind not in ("image", "video"):
        raise PromptError(f"dbtrimkv answers text, image and video parts, got {part!r:.80}")
    value = part.get("url", part.get(kind))
    if kind == "video" and isinstance(value, dict):
        raise PromptError("dbtrimkv does not cut videos to a segment (video_start / video_end): give the clip's path")
    if isinstance(value, Path):
        value = str(value)
    sampling = {k: part[k] for k in ("fps", "max_frames") if kind == "video" and part.get(k) is not None}
    return {"type": kind, kind: value, **sampling}


def ends_with_assistant(chat: list[dict]) -> bool:
    """Whether the chat ends with the start of the assistant's answer (to be continued, not reopened)."""
    return chat[-1]["role"] == "assistant"


def generation_settings(gen_kwargs: dict) -> tuple[dict, list[str]]:
    """(`DBTrimKVPipeline.__call__` keywords, stop strings) for one request's `gen_kwargs`."""
    gen_kwargs = dict(gen_kwargs or {})
    until = gen_kwargs.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    if not all(isinstance(s, str) for s in until):
        raise PromptError(f"until must be a string or a list of strings, got {until!r}")
    max_new = int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    do_sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
    settings = {"max_new_tokens": max_new, "do_sample": do_sample}
    if do_sample:
        settings.update(temperature=temperature or None, top_p=gen_kwargs.get("top_p"))
    return settings, [s for s in until if s]
