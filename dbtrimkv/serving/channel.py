"""The events of one request, from the engine thread to the coroutine that answers its client.

Why: the engine sends a streamed request a token event per step (per `--stream-interval` steps); handing each to the event loop on its
own (a `call_soon_threadsafe` and an SSE write per token) had the loop, which shares the engine's
GIL, take about a fifth of the server's time when 16 clients stream from the tiny model. Here the engine
thread only appends to the request's list and wakes the loop when no wake-up is pending, and the
reader takes everything that arrived since it last looked, with consecutive token pieces joined into
one: a client that keeps up gets a chunk per token, one that lags gets the pieces it missed in one
chunk, never a piece twice or out of order (vLLM's output collector merges deltas the same way).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from .records import Event


class EventChannel:
    """`put` from the engine thread (the request's `sink`); `take` from the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._events: deque[Event] = deque()
        self._lock = threading.Lock()
        self._wake_pending = False
        self._ready = asyncio.Event()

    def put(self, event: Event) -> None:
        with self._lock:
            self._events.append(event)
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self.loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self._ready.set()

    async def take(self) -> list[Event]:
        """Wait for events; every event sent since the last call, in order, consecutive token pieces
        joined into one event."""
        while True:
            with self._lock:
                events = list(self._events)
                self._events.clear()
            if events:
                return merge_tokens(events)
            self._ready.clear()
            with self._lock:
                if self._events:
                    continue
            await self._ready.wait()


def merge_tokens(events: list[Event]) -> list[Event]:
    """Consecutive `token` events as one, the others as they are."""
    out: list[Event] = []
    for event in events:
        if event.kind == "token" and out and out[-1].kind == "token":
            out[-1] = Event("token", text=out[-1].text + event.text)
        else:
            out.append(event)
    return out
