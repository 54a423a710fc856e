"""`dbtrimkv serve`: an OpenAI-compatible server with continuous batching inside one bounded KV memory.

Modules, one job each: `schema` (request validation), `media_sources` (data URIs, allowed files /
URLs), `admission` (pool and view memory, per-request bound and views), `sampling` (the model
runner's, `dbtrimkv.runner`, whose one forward runs a cache's rows; rows join and leave with
`DBTrimKVCache.add_sequence` / `park_sequence`),
`detokenize`, `sessions`, `records` (request and step records), `scheduler` (queue, admission,
prefill budget, batches, parked sessions), `stepper` (one step: forwards, sampling,
fault isolation), `engine` (the loop), `request_bounds` (bounded work before admission), `refusals` (the one message of each refusal rule), `metrics` (Prometheus), `responses` (OpenAI
objects, SSE), `api_errors`, `app` (FastAPI routes), `server` (assembly and start-up report).
"""

from .server import ServerOptions, create_server, startup_report

__all__ = ["ServerOptions", "create_server", "startup_report"]
