"""Conversations whose compressed cache stays in the pool between requests (`session_id`).

Why: with a bounded cache a long-lived conversation costs at most its bound, so a server can keep
it and prefill only each new message. A parked session holds its slots in the shared pool (no
copy); the store is bounded by count, and the least recently used sessions are dropped when the
count is exceeded or the pool needs the room for a waiting request. A dropped session's id is
remembered (bounded) so the next request naming it is told why its history was prefilled again.

Threads: HTTP handlers `claim` a session (reserved: busy, it cannot be dropped) to build the
new turn's inputs; only the engine thread parks, takes over and drops sessions (it owns the pool).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..cache.requests import ParkedSequence

MAX_NOTICES = 4096


@dataclass
class Session:
    id: str
    config_key: tuple
    history: list[dict]  # OpenAI messages the cache has seen, the assistant replies included
    parked: ParkedSequence  # its cache, out of any batch: the slots stay allocated in the pool (its row
    # keeps the last reply's pending token, `runner/pending.py`)
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)
    saved: Any = None  # restored from the session store: a SavedCache whose entries are not in the pool yet


class SessionStore:
    def __init__(self, max_sessions: int):
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._notices: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self.files = None  # session_store.SessionFiles (--session-store): dropped sessions go there, not away

    def __len__(self) -> int:
        return len(self._sessions)

    def reserve(self, session_id: str) -> Session | None:
        """Mark the session busy for a new request; None if there is none. Raises `SessionBusy`."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None and self.files is not None:
                session = self.files.restore(session_id)  # reserved already; placed in the pool when it starts
                if session is not None:
                    self._sessions[session_id] = session
                    self._notices.pop(session_id, None)
                return session
            if session is None:
                return None
            if session.busy:
                raise SessionBusy(session_id)
            session.busy = True
            return session

    def claim(self, session_id: str, config_key: tuple, canonical: list[tuple]) -> tuple[Session | None, bool, str | None]:
        """For a request naming `session_id`: the session reserved for it (None if there is none),
        whether the request continues it (same eviction settings, its messages extend the session's
        history) and the notice its answer carries (why an earlier session is gone, or that this one
        restarts). Raises `SessionBusy`; the caller unreserves the session if the request fails."""
        notice = self.notice_for(session_id)
        session = self.reserve(session_id)
        if session is None:
            return None, False, notice
        seen = len(session.history)
        continues = session.config_key == config_key and len(canonical) > seen and canonical[:seen] == session.history
        if not continues:
            notice = (f"session {session_id!r} restarted: the messages do not continue its history (or its eviction "
                      "settings changed), so the whole conversation was prefilled")
        return session, continues, notice

    def unreserve(self, session: Session) -> None:
        with self._lock:
            session.busy = False

    def ids(self) -> list[str]:
        """The ids of the sessions held (parked or running a turn), least recently used first."""
        with self._lock:
            return list(self._sessions)

    def notice_for(self, session_id: str) -> str | None:
        """Why an earlier session with this id is gone (told once)."""
        with self._lock:
            return self._notices.pop(session_id, None)

    # --- engine thread only ------------------------------------------------------------------
    def take(self, session_id: str) -> Session | None:
        """Remove a (reserved) session from the store: its row is about to run again."""
        with self._lock:
            return self._sessions.pop(session_id, None)

    def park(self, session: Session) -> list[Session]:
        """Store a finished turn's session; returns the sessions dropped to stay within the count."""
        with self._lock:
            session.busy, session.last_used = False, time.monotonic()
            self._sessions[session.id] = session
            self._sessions.move_to_end(session.id)
            dropped = []
            while len(self._sessions) > self.max_sessions:
                idle = next((s for s in self._sessions.values() if not s.busy), None)
                if idle is None:
                    break
                dropped.append(self._drop(idle, f"the server keeps at most {self.max_sessions} sessions"))
            return dropped

    def drop_least_recent(self, reason: str) -> Session | None:
        """Drop the least recently used idle session (to make room in the pool)."""
        with self._lock:
            idle = next((s for s in self._sessions.values() if not s.busy), None)
            return self._drop(idle, reason) if idle is not None else None

    def drop_all(self) -> list[Session]:
        """Remove every session (the server stops: with a session store they are spilled to disk)."""
        with self._lock:
            out = list(self._sessions.values())
            self._sessions.clear()
            return out

    def _drop(self, session: Session, reason: str) -> Session:
        del self._sessions[session.id]
        if self.files is not None:  # the engine spills it to the session store: nothing is prefilled again
            return session
        self._notices[session.id] = (f"session {session.id!r} was dropped ({reason}; least recently used first): "
                                     "its history was prefilled again")
        while len(self._notices) > MAX_NOTICES:
            self._notices.popitem(last=False)
        return session

    def slot_ids(self) -> list:
        """The pool slots each stored session holds (tensors)."""
        with self._lock:
            return [s.parked.slots for s in self._sessions.values()]


class SessionBusy(Exception):
    def __init__(self, session_id: str):
        super().__init__(f"session {session_id!r} is answering another request; send the next turn after it ends")
