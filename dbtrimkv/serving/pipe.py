"""The pipe between the HTTP process and the engine process (`engine_process.py`, `engine_worker.py`).

Why: both sides send the same way. Messages go as bytes pickled here, not through
multiprocessing's own pickler: torch registers with that one a reduction that moves every tensor
through shared memory and a file descriptor handed over a socket, which costs more than the
tensors of a prompt are worth. Only these two processes write what crosses the pipe; nothing a
client sends or a file holds is unpickled.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable


def dumps(message) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def recv(conn):
    """The next message (EOFError / OSError once the other process is gone)."""
    return pickle.loads(conn.recv_bytes())


class Outbox:
    """Messages for the other process, sent by one thread of their own: what gathers while a send runs
    goes as one message (a step's tokens for all its rows travel together), and no caller ever waits
    on the pipe. A message that does not pickle goes to `unsendable(message, exc)`, the rest still go."""

    def __init__(self, conn, name: str, unsendable: Callable[[tuple, Exception], None]):
        self._conn, self._unsendable = conn, unsendable
        self._items: list[tuple] = []
        self._closed = self._broken = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, message: tuple) -> None:
        with self._cond:
            if self._broken:  # the other process is gone: its reader fails what waits on it
                return
            self._items.append(message)
            if len(self._items) == 1:
                self._cond.notify()

    def close(self) -> None:
        """Send what is left, then stop (the pipe stays open: its owner closes it)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                batch, self._items = self._items, []
            if not batch:
                return
            try:
                payload = dumps(batch)
            except Exception:  # noqa: BLE001 - find the message at fault; the others go
                payload = dumps([m for m in batch if self._pickles(m)])
            try:
                self._conn.send_bytes(payload)
            except (OSError, ValueError):  # the other process is gone (ValueError: the pipe is closed)
                with self._cond:
                    self._broken, self._items = True, []
                return

    def _pickles(self, message: tuple) -> bool:
        try:
            dumps(message)
        except Exception as exc:  # noqa: BLE001 - reported to the owner, who answers for it
            self._unsendable(message, exc)
            return False
        return True
