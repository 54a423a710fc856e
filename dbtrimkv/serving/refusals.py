"""The one message of each refusal rule of the server, whatever path applies the rule.

Why: a rule such as "a prefill chunk is never larger than the step's prefill budget" is checked in
several places: on the command line before the model loads (`commands/serve.py`, a `ConfigError`),
when the engine starts (a `ConfigError`) and per request (an HTTP 400 / 413). Each place used to word
it its own way, so an operator and a client read two explanations of one limit. Here each rule has one
function that builds its message; every path that applies the rule raises its own error class (the
CLI's `ConfigError`, the API's status code) with that message. No heavy imports: the CLI reads this
before loading anything. Tested: `tests/serving/test_refusals.py` (the same words from each path).
"""

from __future__ import annotations


def no_budget() -> str:
    """A server admits requests by their KV bound: it needs a budget."""
    return ("dbtrimkv serve needs a KV budget (--budget or --memory-size; --full-cache cannot be served): admission "
            "control reserves each request's KV bound, and a full cache has none")


def chunk_over_step_budget(chunk: int, step_budget: int) -> str:
    """A prefill chunk is never split, so it must fit the prefill budget of one engine step."""
    return (f"--max-prefill-tokens-per-step ({step_budget}), the prefill budget per step, must be at least "
            f"--prefill-chunk ({chunk}): a chunk is never split (that would change answers)")


def bad_stream_interval(value) -> str:
    """Text goes out every N tokens: N counts tokens."""
    return f"--stream-interval must be a whole number of tokens >= 1, got {short(value)}"


def budget_over_server(budget: int | None, server_budget: int) -> str:
    """A request may not keep more entries than the server's budget (its settings cap every request)."""
    return (f"eviction: a request may keep at most the server's budget of {server_budget} entries "
            f"(got {'no limit' if budget is None else budget})")


def over_pool(slots: int, view_bytes: int, pool_slots: int, pool_view_bytes: int) -> str:
    """A request whose bound (or views) exceeds the whole pool could never run."""
    return (f"one request may hold up to {slots} KV entries and {view_bytes} bytes of attention views, more than the "
            f"whole pool ({pool_slots} entries) or view memory ({pool_view_bytes} bytes) of --kv-memory; lower the "
            "budget or the prefill chunk, or give the server more --kv-memory")


def prompt_too_long(limit: int) -> str:
    """A prompt over `--max-prompt-tokens`, whether its text was surely over (counted in pieces) or its
    rendered prompt was (counted whole)."""
    return f"the prompt has more than {limit} tokens, this server's limit (--max-prompt-tokens)"


def body_too_large(max_bytes: int) -> str:
    return f"the request body is larger than {max_bytes} bytes (--max-request-mb)"


def media_too_large(where: str, max_bytes: int) -> str:
    """An image or video (data URI, allowed file or download) over the per-request byte cap."""
    return f"{where}: the media is larger than {max_bytes} bytes (--max-request-mb)"


def queue_full(max_queue: int) -> str:
    return f"the queue is full ({max_queue} requests waiting, --max-queue); retry later"


def shutting_down() -> str:
    return "the server is shutting down"


def engine_exited(exit_code) -> str:
    return f"the engine process exited (code {exit_code}); this server answers no request until it is restarted"


def model_not_found(model, served: str) -> str:
    """`model` (a request's field or a path's id) is not the one this server serves."""
    return f"the model {short(model)} does not exist; this server serves {served!r}"


def short(value) -> str:
    """A client's value as shown in a message: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
