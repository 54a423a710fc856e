"""The Ray Serve request router of `dbtrimkv serve --replicas N`: sessions stick, the rest go where KV room is.

Why: routers in the field assume cached KV stays resident (prefix-hash affinity, KV-event
routers); with eviction those signals go stale. What a dbtrimkv replica can promise is its
admission capacity: pool entries not reserved by running requests and parked sessions, minus what
its waiting queue will reserve. Each replica reports that (`record_routing_stats`, every
`STATS_PERIOD_S`), with the ids of the sessions it holds. The router ranks:

1. a request with a `session_id` goes to the replica this router last sent it to, else to one
   that reports holding it (its cache is there: no prefill, no file read); if none of them is
   alive, the rule below picks a replica, which resumes the session from the shared store;
2. every other request goes to the replica with the most free admission capacity, counting the
   requests this router sent since that replica's last report (each at one request bound), so a
   burst between two reports spreads instead of piling onto one replica.

No round-robin and no prefix hashing. Ties go to fewer running requests, then the replica id (a
fixed order, so the same state gives the same choice). `rank_replicas` is the pure rule (tested
without Ray); `KVAwareRouter` wires it into Ray Serve's `RequestRouter`. The latest stats are also
kept per process (`latest_stats`) so the ingress in this process can serve every replica's
`/metrics`.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from dataclasses import dataclass

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

STATS_PERIOD_S = 0.5  # how often replicas report (RequestRouterConfig.request_routing_stats_period_s)
MAX_REMEMBERED_SESSIONS = 100_000

def _latest() -> dict[str, dict]:
    """Replica id -> its last reported stats, one dict per process. Looked up in the imported module:
    Ray may ship this code pickled by value, with private copies of module globals."""
    return importlib.import_module(__name__).__dict__.setdefault("LATEST_STATS", {})


def latest_stats() -> dict[str, dict]:
    """The last stats each live replica reported to a router in this process (for `/metrics`)."""
    return dict(_latest())


@dataclass
class ReplicaView:
    """What the rule knows of one replica."""

    id: str
    free_slots: int = 0  # pool entries neither reserved nor wanted by the waiting queue, at its last report
    request_bound: int = 1  # entries one default request reserves
    running: int = 0
    sessions: frozenset = frozenset()
    sent_since_report: int = 0  # requests this router sent it after that report

    @property
    def capacity(self) -> int:
        return self.free_slots - self.sent_since_report * self.request_bound


def rank_replicas(replicas: list[ReplicaView], session_id: str | None = None, home: str | None = None) -> list[str]:
    """Replica ids, most preferred first (see the module docstring); `home`: where this router last
    sent `session_id`."""
    order = sorted(replicas, key=lambda r: (-r.capacity, r.running, r.id))
    if session_id is not None:
        holders = [r for r in order if r.id == home] + [r for r in order if r.id != home and session_id in r.sessions]
        order = holders + [r for r in order if r not in holders]
    return [r.id for r in order]


class KVAwareRouter(FIFOMixin, RequestRouter):
    """Ray Serve glue around `rank_replicas` (request kwargs carry `session_id`)."""

    def initialize_state(self, **kwargs) -> None:
        self._sessions: OrderedDict[str, str] = OrderedDict()  # session id -> replica this router sent it to
        self._sent: dict[str, int] = {}
        self._report: dict[str, object] = {}  # replica id -> the stats' sequence number last seen

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Ray Serve hands over the live replicas whenever their set or their stats change."""
        super().update_replicas(replicas)
        latest = _latest()
        for replica in replicas:
            latest[replica.replica_id.unique_id] = replica.routing_stats or {}
        for gone in set(latest) - {r.replica_id.unique_id for r in replicas}:
            latest.pop(gone, None)

    def _view(self, replica: RunningReplica) -> ReplicaView:
        rid, stats = replica.replica_id.unique_id, replica.routing_stats or {}
        if stats.get("seq") != self._report.get(rid):  # a fresh report covers what was sent before it
            self._report[rid], self._sent[rid] = stats.get("seq"), 0
        return ReplicaView(rid, int(stats.get("free_slots", 0)), max(int(stats.get("request_bound", 1)), 1),
                           int(stats.get("running", 0)), frozenset(stats.get("sessions", ())), self._sent.get(rid, 0))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all busy: back off, do not spin
        session_id = pending_request.kwargs.get("session_id") if pending_request is not None else None
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranked = rank_replicas([self._view(r) for r in candidate_replicas], session_id,
                               self._sessions.get(session_id) if session_id is not None else None)
        return [[by_id[rid]] for rid in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        rid = replica_id.unique_id
        self._sent[rid] = self._sent.get(rid, 0) + 1
        session_id = pending_request.kwargs.get("session_id")
        if session_id is not None:
            self._sessions[session_id] = rid
            self._sessions.move_to_end(session_id)
            while len(self._sessions) > MAX_REMEMBERED_SESSIONS:
                self._sessions.popitem(last=False)

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        _latest().pop(replica_id.unique_id, None)
        self._report.pop(replica_id.unique_id, None)
        self._sent.pop(replica_id.unique_id, None)
