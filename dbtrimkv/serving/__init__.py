"""`dbtrimkv serve`: an OpenAI-compatible server with continuous batching inside one bounded KV memory.

Modules, one job each: `schema` (request validation), `media_sources` (data URIs, allowed files /
URLs), `admission` (pool and view memory, per-request bound and views), `sessions`, `records`
(request and step records), `submission` (from a chat request to a submitted engine request),
`scheduler` (queue, admission, prefill budget, batches, parked sessions), `stepper` (one step over
the model runner, `dbtrimkv.runner`: forwards, sampling, each row's text, fault isolation), `engine`
(the loop), `engine_process` / `engine_worker` / `pipe` (the engine in a process of its own: the
HTTP side, the child's side, the pipe between), `replica_spec` (what an engine of its own is built
from), `channel` (events to the event loop), `request_bounds` (bounded work
before admission), `refusals` (the one message of each refusal rule), `metrics` (Prometheus),
`responses` (OpenAI objects, SSE), `api_errors`, `app` (FastAPI routes), `server` (assembly and
start-up report), `ray_*` (replicas on Ray Serve).
"""

from .server import ServerOptions, create_server, startup_report

__all__ = ["ServerOptions", "create_server", "startup_report"]
