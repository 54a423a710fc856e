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

import threading
import time
from collections.abc import Callable, MutableMapping

import numpy as np
import torch

from .cache import DBTrimKVCache
from .settings.config import MAX_PREFILL_CHUNK
from .errors import ConfigError
from .modeling.model_state import model_state
from .runner.decode import DecodeRow, decode
from .runner.pending import pending_rows, record_generation, with_pending_tokens
from .runner.input_checks import check_inputs
from .runner.positions import check_token_ids, with_input_defaults
from .runner.prefill import PromptBatch, progress_reporter
from .runner.sampling import SEED_RANGE, InvalidSampling, LocalSampling, Sampler, integer_value

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
    _, chunk = _check_generate_arguments(inputs, cache, 1, chunk)
    _check_reporting(progress, None)
    cache.check_model(model)
    check_token_ids(model, inputs["input_ids"])
    check_inputs(model, inputs)
    width, given = inputs["input_ids"].shape[1], upto
    upto = None if upto is None else integer_value(upto)
    if given is not None and (upto is None or not 1 <= upto <= width):
        raise ConfigError(f"upto must be an integer in [1, {width}] (the input's columns) or None, got {given!r}")
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
    max_new_tokens, prefill_chunk = _check_generate_arguments(inputs, cache, max_new_tokens, prefill_chunk)
    _check_reporting(progress, timings)
    cache.check_model(model)
    check_token_ids(model, inputs["input_ids"])
    batch = inputs["input_ids"].shape[0]
    check_inputs(model, inputs, [bool(row.pending) for row in pending_rows(cache, batch)])  # (fed first)
    rows, pad = decode_rows_for(model, batch, max_new_tokens, options)  # checks the options
    with model_lock(model):
        return _generate(model, inputs, cache, max_new_tokens, prefill_chunk, progress, timings, options, rows, pad)


def _check_generate_arguments(inputs, cache: DBTrimKVCache, max_new_tokens, prefill_chunk) -> tuple[int, int | None]:
    """ConfigError for arguments that would otherwise fail deep inside torch or transformers; returns
    `max_new_tokens` and `prefill_chunk` as plain ints (a numpy or torch integer is taken as the int it holds)."""
    tokens = integer_value(max_new_tokens)
    if tokens is None or tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    chunk = None if prefill_chunk is None else integer_value(prefill_chunk)
    if prefill_chunk is not None and (chunk is None or not 1 <= chunk <= MAX_PREFILL_CHUNK):
        raise ConfigError(f"prefill_chunk must be an integer in [1, {MAX_PREFILL_CHUNK}] or None, got {prefill_chunk!r}")
    ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ConfigError("inputs must hold input_ids of shape [batch, tokens] (see dbtrimkv.inputs.prompts.build_inputs)")
    if cache.batch_size not in (-1, ids.shape[0]):
        raise ConfigError(f"this cache holds {cache.batch_size} sequences, but the input has {ids.shape[0]}: "
                          "use a new cache for a batch of another size")
    return tokens, chunk


def _check_reporting(progress, timings) -> None:
    if not (isinstance(progress, bool) or callable(progress)):
        raise ConfigError(f"progress must be True, False or a callable (done, total), got {progress!r}")
    if timings is not None and not isinstance(timings, MutableMapping):
        raise ConfigError(f"timings must be a dict or None, got {type(timings).__name__}")


def _ids(value) -> frozenset[int]:
    values = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
    return frozenset(int(v) for v in values if v is not None)


def _token_ids(model, name: str, value, many: bool):
    """A caller's eos_token_id (an id or a list of ids; `many`) or pad_token_id (one id), as plain ints in the
    model's vocabulary; ConfigError naming `name` otherwise."""
    vocab = model.get_input_embeddings().num_embeddings
    if many and isinstance(value, torch.Tensor) and value.dim() == 1:
        value = value.tolist()
    listed = many and isinstance(value, (list, tuple, set, frozenset))
    values = [integer_value(v) for v in (value if listed else [value])]
    if any(v is None or not 0 <= v < vocab for v in values):
        kind = "an integer token id or a list of them" if many else "an integer token id"
        raise ConfigError(f"{name} must be {kind} in [0, {vocab - 1}] (the model's vocabulary), got {value!r}")
    return values if listed else values[0]


def decode_rows_for(model, batch: int, max_new_tokens: int, options: dict) -> tuple[list[DecodeRow], int]:
    """One `DecodeRow` per sequence from `generate`'s options (defaults: the model's generation config),
    and the id that pads a row that stopped early. Checks the options: ConfigError naming the one at fault."""
    config = getattr(model, "generation_config", None)

    def setting(name, fallback):
        value = options.get(name)
        return value if value is not None else (getattr(config, name, None) if config is not None else None) or fallback

    _check_callbacks(options, batch)
    seed = options.get("seed")
    if seed is not None:
        whole = integer_value(seed)
        if whole is None or not SEED_RANGE[0] <= whole <= SEED_RANGE[1]:
            raise InvalidSampling("seed", f"'seed' must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {seed!r}")
        seed = whole
    sample = options.get("do_sample")
    if sample is not None and not isinstance(sample, (bool, np.bool_)):
        raise ConfigError(f"do_sample must be True, False or None, got {sample!r}")
    try:
        if sample if sample is not None else (getattr(config, "do_sample", False) if config is not None else False):
            params = LocalSampling(max_tokens=max_new_tokens, temperature=setting("temperature", 1.0),
                                   top_p=setting("top_p", 1.0), top_k=setting("top_k", 0), seed=seed)
        else:
            params = LocalSampling(max_tokens=max_new_tokens, temperature=0.0)
    except InvalidSampling as error:
        if error.field != "max_tokens":  # the other fields are spelled as generate takes them
            raise
        raise InvalidSampling("max_new_tokens", str(error).replace("'max_tokens'", "max_new_tokens")) from None
    least = options.get("min_new_tokens")
    least = 0 if least is None else integer_value(least)
    if least is None or least < 0:
        raise ConfigError(f"min_new_tokens must be a non-negative integer, got {options.get('min_new_tokens')!r}")
    eos = options.get("eos_token_id")
    stop = _ids(_token_ids(model, "eos_token_id", eos, many=True) if eos is not None else setting("eos_token_id", None))
    pad = options.get("pad_token_id")
    if pad is not None:
        pad = _token_ids(model, "pad_token_id", pad, many=False)
    else:
        pad = getattr(config, "pad_token_id", None) if config is not None else None
    pad = pad if pad is not None else (min(stop) if stop else 0)
    done = options.get("done")
    dones = list(done) if isinstance(done, (list, tuple)) else [done] * batch
    rows = []
    for b in range(batch):
        drawn = None if seed is not None else int(torch.randint(2**62, (1,)))  # follows torch.manual_seed
        rows.append(DecodeRow(Sampler(params, seed=drawn), stop, dones[b], least))
    return rows, pad


def _check_callbacks(options: dict, batch: int) -> None:
    """ConfigError for a streamer, done, logits_processor or stopping_criteria that could not be called."""
    streamer = options.get("streamer")
    if streamer is not None and not all(callable(getattr(streamer, name, None)) for name in ("put", "end")):
        raise ConfigError(f"streamer must have put() and end() methods (e.g. transformers' TextStreamer), "
                          f"got {type(streamer).__name__}")
    done = options.get("done")
    dones = list(done) if isinstance(done, (list, tuple)) else [done]
    if isinstance(done, (list, tuple)) and len(dones) != batch:
        raise ConfigError(f"done takes one predicate, or one per row ({batch}), got {len(dones)}")
    if not all(d is None or callable(d) for d in dones):
        raise ConfigError("done must be a callable (a row's generated ids -> bool), a list of them (one per row) "
                          f"or None, got {done!r}")
    processor = options.get("logits_processor")
    if processor is not None and not callable(processor):
        raise ConfigError(f"logits_processor must be a callable (ids, scores) -> scores, e.g. a transformers "
                          f"LogitsProcessorList, got {type(processor).__name__}")
    criteria = options.get("stopping_criteria")
    if criteria is not None and (not isinstance(criteria, (list, tuple)) or not all(callable(c) for c in criteria)):
        raise ConfigError("stopping_criteria must be a list of callables (ids, scores) -> [batch] bools, e.g. a "
                          f"transformers StoppingCriteriaList, got {type(criteria).__name__}")


def _generate(model, inputs, cache, max_new_tokens, prefill_chunk, progress, timings, options, rows, pad):
    device = next(model.parameters()).device
    inputs = with_pending_tokens(cache, inputs, device)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if ids.shape[1] == 0:
        raise ConfigError("the prompt is empty")
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
