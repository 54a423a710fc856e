"""What the engine does when serving one request fails, so that only that request fails.

Why: a server batches many clients' requests; one bad request (an image that breaks the vision
tower, logits its sampler cannot draw from, a tokenizer error, an out-of-memory) must fail alone
and free its slots, while the others finish with the tokens they get alone. The engine does all
per-row work that can fail (vision encoding, building the row, sampling, detokenizing) row by row
and fails only that row. What remains is the batched forward itself: one that stops halfway leaves
its cache unusable (some layers wrote new entries, some slots were taken and are in no table), with
no row to blame. Then the engine drops that batch's cache, gives the pool back every slot that no
live cache, parked row or session holds (`Scheduler.reclaim`, through `KVStore.reclaim`), and runs each of the batch's requests
again in a batch of its own (`EngineRequest.restart`): batching never changes a row's answer and an
unseeded request keeps the seed it drew, so an innocent request regenerates the tokens it already
sent (they are not sent twice), while the request at fault fails again, alone, and only it gets
the error. A request that continued a session cannot be restarted (its cached history went with
the batch): it gets `BatchFailed` (503, retry: the conversation is prefilled again).
"""
