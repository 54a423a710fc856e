"""`dbtrimkv serve`: an OpenAI-compatible server with continuous batching inside one bounded KV pool.

Modules, one job each: `schema` (request validation), `media_sources` (data URIs, allowed files /
URLs), `admission` (pool size and per-request bound), `batch_step` (one ragged batched forward over
a cache's rows; rows join and leave with `DBTrimKVCache.add_sequence` / `park_sequence`), `sampling`,
`detokenize`, `sessions`, `engine` (the loop), `metrics` (Prometheus), `responses` (OpenAI objects,
SSE), `api_errors`, `app` (FastAPI routes), `server` (assembly and start-up report).
"""

from .server import ServerOptions, create_server, startup_report

__all__ = ["ServerOptions", "create_server", "startup_report"]
