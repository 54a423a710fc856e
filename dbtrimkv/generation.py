"""`dbtrimkv.prefill` and `dbtrimkv.generate`: the public one-call API over the model runner.

Why: a user with a model, processor outputs and a `DBTrimKVCache` wants one call that keeps KV
memory bounded whatever the prompt length. Both calls run on the model runner (`dbtrimkv.runner`):
chunked prefill with eviction (`runner.prefill`), then decode steps (`runner.decode`) through the
same one forward. The arguments are checked here, before anything runs. A cache that already holds
earlier turns is continued: only the new tokens are processed, after the pending token of the last
reply (`runner.pending`). `model.generate(..., cache=cache)` stays the transformers-native path; for
greedy decoding it gives the same tokens (tests/engine/test_native_generate.py).
"""

from __future__ import annotations

import numbers
import threading
import time
from collections.abc import Callable

import torch

from .cache import DBTrimKVCache
from .settings.config import MAX_PREFILL_CHUNK
from .errors import ConfigError
from .modeling.model_state import model_state
from .runner.decode import DecodeRow, decode
from .runner.pending import record_generation, with_pending_tokens
from .runner.positions import check_token_ids, with_input_defaults
from .runner.prefill import PromptBatch, progress_reporter
from .runner.sampling import LocalSampling, Sampler

# `generate` keyword arguments of transformers' `generate` that the runner honours
GENERATE_OPTIONS = {"do_sample", "temperature", "top_p", "top_k", "streamer", "logits_processor", "stopping_criteria",
                    "min_new_tokens", "eos_token_id", "pad_token_id", "done", "seed"}


def model_lock(model) -> threading.RLock:
    """One generation at a time per model: the hooks write the model's `ModelState` (the gates' last outputs)."""
    return model_state(model).lock


@torch.no_grad()
def prefill(model, inputs, cache: DBTrimKVCache, chunk: int | None = None, upto: int | None = None,
            progress: bool | Callable[[int, int], None] = False) -> torch.Tensor:
    """Feed the new tokens of `inputs` (columns `[0, upto)`) to the model in chunks, evicting as it goes.

    `inputs`: processor outputs for tokens the cache has not seen (input_ids, attention_mask,
    mm_token_type_ids, pixel values, grids). Returns the logits of the last processed column `[B, V]`.
    """
    if not isinstance(cache, DBTrimKVCache):
        raise ConfigError("dbtrimkv.prefill needs a DBTrimKVCache")
    _check_generate_arguments(inputs, cache, 1, chunk)
    cache.check_model(model)
    check_token_ids(model, inputs["input_ids"])
    chunk = chunk or cache.config.prefill_chunk
    inputs = with_input_defaults(inputs, next(model.parameters()).device)
    prompt = PromptBatch.after(model, cache, inputs)
    upto = prompt.width if upto is None else upto
    logits = prompt.run(cache, 0, upto, chunk, progress_reporter(progress, upto, chunk))
    prompt.finish(cache, upto)
    return logits


@torch.no_grad()
def generate(model, inputs, cache: DBTrimKVCache, max_new_tokens: int = 64, prefill_chunk: int | None = None,
             progress: bool | Callable[[int, int], None] = False, timings: dict | None = None,
             **options) -> torch.Tensor:
    """Chunked prefill of `inputs` into `cache`, then decoding; returns generated ids `[B, N]` (a row that
    stopped early is padded with the pad id).

    `inputs` are processor outputs for new tokens; if the cache already holds earlier turns, the new
    tokens are appended to them. `options` are the `model.generate` options the runner honours:
    do_sample, temperature, top_p, top_k (None: the model's generation config), streamer,
    logits_processor, stopping_criteria, min_new_tokens, eos_token_id, pad_token_id, plus `seed` (the sampler's; default:
    drawn from torch's generator) and `done` (a predicate over a row's generated ids that ends it, shared by
    all rows, or a list of them, one per row: e.g. each row's own `runner.text.TextTracker.done`). If `timings` is a dict, it receives `prefill_seconds` and `decode_seconds` (the
    decode part includes the last prompt token's forward).
    """
    if not isinstance(cache, DBTrimKVCache):
        raise ConfigError("dbtrimkv.generate needs a DBTrimKVCache")
    unknown = sorted(set(options) - GENERATE_OPTIONS)
    if unknown:
        raise ConfigError(f"dbtrimkv.generate does not take {', '.join(unknown)} (it takes "
                          f"{', '.join(sorted(GENERATE_OPTIONS))})")
    _check_generate_arguments(inputs, cache, max_new_tokens, prefill_chunk)
    cache.check_model(model)
    check_token_ids(model, inputs["input_ids"])
    with model_lock(model):
        return _generate(model, inputs, cache, max_new_tokens, prefill_chunk, progress, timings, options)


def _check_generate_arguments(inputs, cache: DBTrimKVCache, max_new_tokens, prefill_chunk) -> None:
    """ConfigError for arguments that would otherwise fail deep inside torch or transformers."""
    def whole(value) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if not whole(max_new_tokens) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if prefill_chunk is not None and (not whole(prefill_chunk) or not 1 <= prefill_chunk <= MAX_PREFILL_CHUNK):
        raise ConfigError(f"prefill_chunk must be an integer in [1, {MAX_PREFILL_CHUNK}] or None, got {prefill_chunk!r}")
    ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ConfigError("inputs must hold input_ids of shape [batch, tokens] (see dbtrimkv.inputs.prompts.build_inputs)")
    if cache.batch_size not in (-1, ids.shape[0]):
        raise ConfigError(f"this cache holds {cache.batch_size} sequences, but the input has {ids.shape[0]}: "
                          "use a new cache for a batch of another size")


def _ids(value) -> frozenset[int]:
    values = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
    return frozenset(int(v) for v in values if v is not None)


def decode_rows_for(model, batch: int, max_new_tokens: int, options: dict) -> tuple[list[DecodeRow], int]:
    """One `DecodeRow` per sequence from `generate`'s options (defaults: the model's generation config),
    and the id that pads a row that stopped early."""
    config = getattr(model, "generation_config", None)

    def setting(name, fallback):
        value = options.get(name)
        return value if value is not None else (getattr(config, name, None) if config is not None else None) or fallback

    seed = options.get("seed")
    if options.get("do_sample", getattr(config, "do_sample", False) if config is not None else False):
        params = LocalSampling(max_tokens=max_new_tokens, temperature=setting("temperature", 1.0),
                               top_p=setting("top_p", 1.0), top_k=setting("top_k", 0), seed=seed)
    else:
        params = LocalSampling(max_tokens=max_new_tokens, temperature=0.0)
    least = options.get("min_new_tokens") or 0
    if isinstance(least, bool) or not isinstance(least, int) or least < 0:
        raise ConfigError(f"min_new_tokens must be a non-negative integer, got {least!r}")
    stop = _ids(setting("eos_token_id", None))
    pad = options.get("pad_token_id", getattr(config, "pad_token_id", None) if config is not None else None)
    pad = pad if pad is not None else (min(stop) if stop else 0)
    done = options.get("done")
    dones = list(done) if isinstance(done, (list, tuple)) else [done] * batch
    if len(dones) != batch:
        raise ConfigError(f"done takes one predicate, or one per row ({batch}), got {len(dones)}")
    rows = []
    for b in range(batch):
        drawn = None if seed is not None else int(torch.randint(2**62, (1,)))  # follows torch.manual_seed
        rows.append(DecodeRow(Sampler(params, seed=drawn), stop, dones[b], least))
    return rows, pad


def _generate(model, inputs, cache, max_new_tokens, prefill_chunk, progress, timings, options):
    device = next(model.parameters()).device
    inputs = with_pending_tokens(cache, inputs, device)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if ids.shape[1] == 0:
        raise ConfigError("the prompt is empty")
    if bool(inputs["mm_token_type_ids"][:, -1].any()):
        raise ConfigError("the prompt must end with a text token (e.g. the chat template's generation prompt)")
    rows, pad = decode_rows_for(model, ids.shape[0], max_new_tokens, options)
    known_ids, known_mask = cache.known_tokens(ids.shape[0], device)
    history = torch.cat([known_ids[:, : cache.columns], ids], 1)
    history_mask = torch.cat([known_mask[:, : cache.columns], mask], 1)
    chunk = prefill_chunk or cache.config.prefill_chunk
    streamer = options.get("streamer")
    if streamer is not None:
        streamer.put(ids.cpu())  # the prompt (a streamer with skip_prompt skips it)
    start = time.perf_counter()
    prompt = PromptBatch.after(model, cache, inputs)
    prompt.run(cache, 0, ids.shape[1] - 1, chunk, progress_reporter(progress, ids.shape[1] - 1, chunk))
    prefilled = time.perf_counter()
    try:
        logits = prompt.run(cache, ids.shape[1] - 1, ids.shape[1], 1)  # the last prompt token: its logits start decoding
        prompt.finish(cache, ids.shape[1])
        on_step = None if streamer is None else (lambda step: streamer.put(torch.tensor([step[0]])))
        decode(model, cache, logits, rows, max_new_tokens, history, options.get("logits_processor"),
               options.get("stopping_criteria"), on_step)
    finally:
        if streamer is not None:
            streamer.end()
    if timings is not None:
        timings.update(prefill_seconds=prefilled - start, decode_seconds=time.perf_counter() - prefilled)
    return record_generation(cache, history, history_mask, [row.generated for row in rows], pad)
