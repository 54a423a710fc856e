"""`dbtrimkv serve --replicas N`: the OpenAI API from N engine replicas as Ray Serve deployments.

Why: one process owns one accelerator; past it, Ray Serve places replicas on every machine of a
cluster, restarts dead ones and carries requests between them. Two deployments:

- `EngineReplica` (N replicas): loads the model and runs the very server `dbtrimkv serve` runs
  (`create_server`: pool, engine, app), called in process through `ray_bridge.call_app`. It
  reports its free admission capacity and the sessions it holds as routing stats, saves every
  finished session turn to the shared session store (`--session-store`, write-through), and tags
  its answers with an `x-dbtrimkv-replica` header.
- `Ingress` (one): the HTTP entry behind Ray's proxy. It forwards each request to a replica
  chosen by `ray_router.KVAwareRouter` (the request's `session_id` rides along for the router),
  and serves `/metrics` for every replica. A replica that dies before its answer started (a
  whole JSON answer, or the first chunk of a stream) costs nothing: the request is sent again to
  another replica, which resumes the session from the store. A stream cut later ends with an
  error event.
"""

import asyncio
import itertools  # no `from __future__ import annotations`: FastAPI reads the route annotations at runtime
import json
import sys
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.config import RequestRouterConfig

from .ray_bridge import call_app, merge_metrics
from .ray_router import STATS_PERIOD_S, KVAwareRouter, latest_stats
from .replica_spec import ReplicaSpec
from .server import create_server

REPLICA_HEADER = "x-dbtrimkv-replica"
ATTEMPTS = 3  # sends of a request whose replica died before answering
ROUTER = f"{KVAwareRouter.__module__}:{KVAwareRouter.__name__}"  # by import path: one live copy per process
RESENT_HELP = "Requests sent again to another replica because theirs died before answering"


class EngineReplica:
    def __init__(self, spec: ReplicaSpec):
        self.model, processor, config = spec.load()
        self.app, self.engine = create_server(self.model, processor, config, spec.options)
        self.engine.start()
        self.id = serve.get_replica_context().replica_id.unique_id
        self._seq = itertools.count()

    async def forward(self, method: str, path: str, headers: list, body: bytes, session_id: str | None = None):
        """The app's answer to one HTTP request: `{"status", "headers"}`, then body chunks."""
        async for item in call_app(self.app, method, path, headers, body):
            if isinstance(item, dict):
                item["headers"].append((REPLICA_HEADER, self.id))
            yield item

    def record_routing_stats(self) -> dict:
        """Free admission capacity, load, sessions held and metrics (read by `KVAwareRouter`)."""
        engine = self.engine
        with engine.cond:
            waiting = sum(r.reservation.slots for r in engine.waiting if r.reservation is not None)
        metrics = engine.metrics_text()  # (gauges read now)
        return {"seq": next(self._seq), "free_slots": engine.admission.pool_slots - engine.admission.reserved - waiting,
                "request_bound": int(engine.metrics.get("kv_request_bound_slots")), "running": len(engine.running),
                "waiting": len(engine.waiting), "sessions": engine.sessions.ids(), "metrics": metrics}

    def check_health(self) -> None:
        thread = self.engine._thread
        if self.engine.stopping or thread is None or not thread.is_alive():
            raise RuntimeError("the engine thread is not running")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()  # parked sessions go to the session store


async def _rest(stream, start: dict):
    """The body chunks; a replica lost mid-stream ends a server-sent-event stream with an error event."""
    try:
        async for chunk in stream:
            yield chunk
        stream = None
    except RayError as exc:
        stream = None
        if dict(start["headers"]).get("content-type", "").startswith("text/event-stream"):
            error = {"error": {"message": f"the replica answering this request failed ({type(exc).__name__}); "
                                          "send the request again", "type": "server_error", "param": None,
                               "code": None}}
            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
    finally:
        if stream is not None:  # the client went away: the replica cancels the request and frees its slots
            stream.cancel()


def _session_id(body: bytes) -> str | None:
    try:
        value = json.loads(body).get("session_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


# `serve.ingress` pickles the routes when the class is defined: every name they use must exist above.
ingress_app = FastAPI(title="dbtrimkv (Ray Serve)")


@serve.ingress(ingress_app)
class Ingress:
    def __init__(self, engines):
        self.engines = engines.options(stream=True)
        self.resent = 0  # requests sent again because their replica died before answering

    @ingress_app.get("/metrics")
    async def metrics(self):
        texts = {rid: stats.get("metrics", "") for rid, stats in latest_stats().items()}
        own = (f"# HELP dbtrimkv_ingress_resent_total {RESENT_HELP}\n# TYPE dbtrimkv_ingress_resent_total counter\n"
               f"dbtrimkv_ingress_resent_total {self.resent}\n")
        return PlainTextResponse(merge_metrics(texts) + own, media_type="text/plain; version=0.0.4")

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(self, path: str, request: Request):
        body = await request.body()
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = list(request.headers.items())
        session_id = _session_id(body) if request.method == "POST" else None
        failure = None
        for _ in range(ATTEMPTS):
            stream = self.engines.forward.remote(request.method, target, headers, body, session_id=session_id)
            try:
                start = await stream.__anext__()
            except asyncio.CancelledError:  # the client went away while the replica was answering
                stream.cancel()
                raise
            except RayError as exc:  # the replica died before answering: nothing was sent, send it again
                failure = exc
                self.resent += 1
                continue
            return StreamingResponse(_rest(stream, start), status_code=start["status"], headers=dict(start["headers"]))
        return JSONResponse({"error": {"message": f"no replica could answer ({type(failure).__name__})",
                                       "type": "server_error", "param": None, "code": None}}, status_code=503)


def build_application(spec: ReplicaSpec, replicas: int, gpus_per_replica: float = 0.0):
    """The Serve application: `Ingress` in front of `replicas` `EngineReplica`s routed by `KVAwareRouter`."""
    options = spec.options
    engines = serve.deployment(EngineReplica, name="EngineReplica").options(
        num_replicas=replicas, max_ongoing_requests=options.max_running + options.max_queue,
        ray_actor_options={"num_cpus": 1, "num_gpus": gpus_per_replica}, health_check_period_s=2,
        request_router_config=RequestRouterConfig(request_router_class=ROUTER,
                                                  request_routing_stats_period_s=STATS_PERIOD_S,
                                                  request_routing_stats_timeout_s=10))
    ingress = serve.deployment(Ingress, name="Ingress").options(num_replicas=1, max_ongoing_requests=10_000,
                                                                ray_actor_options={"num_cpus": 0})
    return ingress.bind(engines.bind(spec))


def run(spec: ReplicaSpec, replicas: int, host: str, port: int, ray_address: str | None, gpus_per_replica: float):
    """Join (or start) a Ray cluster, serve on host:port and block until interrupted."""
    import ray

    ray.init(address=ray_address, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(spec, replicas, gpus_per_replica), name="dbtrimkv", route_prefix="/")
    print(f"dbtrimkv serve: {replicas} replicas on Ray ({ray.get_runtime_context().gcs_address}), "
          f"OpenAI API at http://{host}:{port}/v1", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
