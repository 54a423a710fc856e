"""Sessions on disk (`dbtrimkv serve --session-store DIR`): spilled, resumed without re-prefill.

Why: a parked session holds pool slots; when the pool needs them (or the session count is
exceeded, or the server stops) the session used to be dropped and its whole history prefilled
again on the next turn. With a store, its compressed cache is written to `DIR` instead (one
`cache/portable.py` file per session: kept entries, bookkeeping, settings, history, last reply)
and read back when the next request names it, on this server or on any other serving the same
model with the same folder (Ray Serve replicas share it). `write_through` also saves every
finished turn, so a replica that dies loses no session.

Threads: HTTP handlers `restore` (file read, host tensors; the session then waits, reserved, in the
in-memory `SessionStore`); only the engine thread `place`s its entries into the pool and `spill`s.
File names are a digest of the session id, so any id is a safe name.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from ..cache.portable import ModelIdentity, read_saved, save_parked
from ..cache.requests import ParkedSequence
from ..settings.config import DBTrimKVConfig
from ..errors import CacheFileError, ConfigError
from .records import config_key
from .sessions import Session

KIND = "server-session"


class SessionFiles:
    def __init__(self, folder: str | Path, identity: ModelIdentity, write_through: bool = False):
        self.folder = check_folder(folder)
        self.identity, self.write_through = identity, write_through
        self.segments = identity.num_layers * identity.num_kv_heads

    def path_for(self, session_id: str) -> Path:
        return self.folder / f"{hashlib.sha256(session_id.encode()).hexdigest()[:40]}.dbkv"

    # --- HTTP threads ------------------------------------------------------------------------------
    def restore(self, session_id: str) -> Session | None:
        """The session saved under `session_id`, reserved (busy), its entries still on the host (they go
        into the pool when its request starts); None when there is no usable file."""
        path = self.path_for(session_id)
        if not path.is_file():
            return None
        try:
            saved = read_saved(path, self.identity)
            extra = saved.extra
            if extra.get("kind") != KIND or extra.get("id") != session_id:
                raise CacheFileError(f"{path} is not the saved session {session_id!r}")
            config, rows = saved.config, saved.rows()
        except CacheFileError as exc:  # a foreign or damaged file: the history is prefilled again
            print(f"dbtrimkv serve: session store: {exc}", file=sys.stderr)
            return None
        empty = torch.empty(0, dtype=torch.int64)
        placeholder = ParkedSequence(rows[0], empty, torch.zeros(self.segments, dtype=torch.int64))
        session = Session(session_id, config_key(config), [_tuples(m) for m in extra["history"]], placeholder,
                          busy=True)
        session.saved = saved
        return session

    # --- engine thread -----------------------------------------------------------------------------
    def place(self, session: Session, pool, cache) -> ParkedSequence:
        """The session's sequence in the pool: a restored session's entries go into fresh slots (and
        its policy statistics into `cache`, the batch it joins); others are there already."""
        saved = session.saved
        if saved is None:
            return session.parked
        parked, scores = saved.to_parked(pool)
        if scores is not None:
            cache.policy.place_scores(parked.slots, scores, pool.capacity)
        session.parked, session.saved = parked, None
        if not self.write_through:  # the pool holds it now; it is written again if spilled again
            self.discard(session.id)
        return parked

    def spill(self, session: Session, pool, cache=None) -> None:
        """Write the session (in the pool; `cache`: the batch whose policy statistics it carries) to its
        file. A restored session whose entries never reached the pool is on disk already."""
        if session.saved is not None:
            return
        config = DBTrimKVConfig.from_dict({k: dict(v) if k == "policy_options" else v for k, v in session.config_key})
        scores = cache.policy_scores if cache is not None else None
        extra = {"kind": KIND, "id": session.id, "history": session.history}
        try:
            save_parked(self.path_for(session.id), self.identity, config, pool, session.parked, scores, extra)
        except OSError as exc:  # a full or gone disk loses this session (its history is prefilled again), not the server
            print(f"dbtrimkv serve: session store: cannot save session {session.id!r}: {exc}", file=sys.stderr)

    def discard(self, session_id: str) -> None:
        self.path_for(session_id).unlink(missing_ok=True)


def check_folder(folder: str | Path) -> Path:
    """The session store's folder, created if missing; ConfigError unless it is a writable directory."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--session-store {folder} is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--session-store {folder} is not writable ({exc.strerror or exc})") from None
    return folder


def _tuples(value):
    """JSON lists back to the tuples the canonical history is made of."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
