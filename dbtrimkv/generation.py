"""Chunked prefill with eviction, then generation: KV memory bounded whatever the prompt length.

Why: `model.generate(**inputs, cache=cache)` prefills the whole prompt in one forward,
so its K/V must fit before anything can be evicted. `prefill` instead feeds the prompt to the
language model `chunk` tokens at a time; the cache evicts before each chunk, so a sequence never
holds more than `budget + L*H*max(buffer_size, chunk)` entries. Details that keep it exact:

- M-RoPE positions are computed once for all new tokens (Qwen3-VL `get_rope_index`) and offset
  by where the cache's previous turns ended; `model.model.rope_deltas` is set for decoding.
- Images and video frame groups are encoded by the vision tower only when a chunk reaches their
  tokens (one temporal slice of a video at a time, which is what the tower computes anyway), and
  their deepstack features are added chunk by chunk.
- A cache that already holds earlier turns is continued: only the new tokens are processed.

`generate` prefills all but the last prompt token, then hands over to `model.generate` (sampling,
streaming, stopping criteria are transformers'), which decodes through the same cache.
"""

from __future__ import annotations

import numbers
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .cache import DBTrimKVCache
from .config import MAX_PREFILL_CHUNK
from .errors import ConfigError
from .modality import Modality, VISUAL_MODALITIES
from .model_state import model_state
from .rope_scaling import whole_prompt_rotary
from .transformers_compat import cache_kwargs


def language_model_of(model):
    """The text decoder that takes `inputs_embeds` (Qwen3-VL: `model.model.language_model`)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "language_model"):
        return inner.language_model
    if inner is not None:
        return inner
    raise ConfigError(f"unsupported model {type(model).__name__}: no inner decoder found")


def is_vision_language(model) -> bool:
    return hasattr(getattr(model, "model", None), "visual")


@dataclass
class _VisualRun:
    """A run of consecutive vision tokens in one row: one image or one video frame group."""

    row: int
    start: int  # column of its first token (in the new-token columns)
    end: int
    item: int  # index into the vision stream's items


class VisionStream:
    """Encodes images / video frame groups on demand, in the order their tokens appear."""

    def __init__(self, model, inputs, types: torch.Tensor, mask: torch.Tensor):
        self.model = model
        visual = model.model.visual
        self.merge = visual.spatial_merge_size
        self.items: list[tuple[torch.Tensor, torch.Tensor]] = []  # (pixel rows, grid [1, 3])
        for key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            pixels, grids = inputs.get(key), inputs.get(grid_key)
            self._add_items(pixels, grids, Modality.IMAGE if key == "pixel_values" else Modality.VIDEO)
        self.runs = self._find_runs(types, mask)
        self._encoded: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def _add_items(self, pixels, grids, code: int) -> None:
        if pixels is None or grids is None:
            return
        offset = 0
        for t, h, w in grids.tolist():
            for _ in range(t):  # each temporal slice is encoded on its own by the tower
                self.items.append((code, pixels[offset : offset + h * w], torch.tensor([[1, h, w]])))
                offset += h * w

    def _find_runs(self, types: torch.Tensor, mask: torch.Tensor) -> list[_VisualRun]:
        runs, next_item = [], {code: [i for i, it in enumerate(self.items) if it[0] == code] for code in VISUAL_MODALITIES}
        for row in range(types.shape[0]):
            codes = torch.where(mask[row].bool(), types[row], torch.zeros_like(types[row])).tolist()
            col = 0
            while col < len(codes):
                code = codes[col]
                end = col
                while end < len(codes) and codes[end] == code:
                    end += 1
                if code:
                    length = end - col
                    while length > 0:  # adjacent frame groups of one video share a run
                        if not next_item[code]:
                            raise ConfigError(f"more {Modality(code).label} tokens in the prompt than {Modality(code).label} inputs")
                        item = next_item[code].pop(0)
                        n = self._tokens(item)
                        runs.append(_VisualRun(row, end - length, end - length + n, item))
                        length -= n
                    if length < 0:
                        raise ConfigError(f"{Modality(code).label} tokens do not match the {Modality(code).label} grid sizes")
                col = end
        if any(next_item.values()):
            raise ConfigError("some images or videos have no placeholder tokens in the prompt")
        return runs

    def _tokens(self, item: int) -> int:
        _, _, grid = self.items[item]
        return int(grid.prod()) // self.merge**2

    def _encode(self, items: list[int]) -> None:
        if not items:
            return
        visual = self.model.model.visual
        pixels = torch.cat([self.items[i][1] for i in items]).to(visual.device, visual.dtype)
        grids = torch.cat([self.items[i][2] for i in items]).to(visual.device)
        out = visual(pixels, grid_thw=grids)
        sizes = [self._tokens(i) for i in items]
        embeds = torch.split(out.pooler_output, sizes)
        deep = [torch.split(f, sizes) for f in out.deepstack_features]
        for k, i in enumerate(items):
            self._encoded[i] = (embeds[k], [d[k] for d in deep])

    def chunk_features(self, start: int, end: int, batch: int, hidden: int, device, dtype):
        """(visual mask [B, c], embeddings in row-major order, deepstack list) for columns [start, end)."""
        active = [r for r in self.runs if r.start < end and r.end > start]
        if not active:
            return None, None, None
        self._encode([r.item for r in active if r.item not in self._encoded])
        mask = torch.zeros(batch, end - start, dtype=torch.bool, device=device)
        pieces: list[tuple[int, int, torch.Tensor, list[torch.Tensor]]] = []
        for r in active:
            lo, hi = max(r.start, start), min(r.end, end)
            mask[r.row, lo - start : hi - start] = True
            emb, deep = self._encoded[r.item]
            pieces.append((r.row, lo, emb[lo - r.start : hi - r.start], [d[lo - r.start : hi - r.start] for d in deep]))
            if r.end <= end:
                del self._encoded[r.item]  # fully consumed
        pieces.sort(key=lambda p: (p[0], p[1]))  # row-major, like the mask's True positions
        embeds = torch.cat([p[2] for p in pieces]).to(device, dtype)
        deepstack = [torch.cat([p[3][k] for p in pieces]).to(device, dtype) for k in range(len(pieces[0][3]))]
        return mask, embeds, deepstack


def _new_token_positions(model, cache: DBTrimKVCache, inputs, mask: torch.Tensor) -> torch.Tensor:
    """Position ids of the new tokens: `[4, B, T]` (text + M-RoPE) for Qwen3-VL, else `[B, T]`."""
    batch = mask.shape[0]
    return token_positions(model, inputs, mask, cache.seen or [0] * batch, cache.next_mrope_positions(batch))


def token_positions(model, inputs, mask: torch.Tensor, seen: list[int], mrope_start: list[int]) -> torch.Tensor:
    """Positions of new tokens that follow `seen[b]` real tokens whose M-RoPE ran to `mrope_start[b] - 1`."""
    seen = torch.tensor(seen, device=mask.device)[:, None]
    text = torch.where(mask.bool(), seen + torch.cumsum(mask.long(), 1) - 1, torch.zeros_like(mask.long()))
    if not is_vision_language(model):
        return text
    ids = inputs["input_ids"]
    types = inputs.get("mm_token_type_ids")
    if types is None:
        types = torch.zeros_like(ids)
    mrope, _ = model.model.get_rope_index(
        ids, mm_token_type_ids=types, image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"), attention_mask=mask,
    )
    offset = torch.tensor(mrope_start, device=mask.device)[None, :, None]
    mrope = torch.where(mask.bool()[None], mrope + offset, torch.zeros_like(mrope))
    return torch.cat([text[None], mrope], 0)


def rope_deltas(positions: torch.Tensor, mask: torch.Tensor, seen: list[int]) -> list[int | None]:
    """How far each sequence's M-RoPE runs ahead of its text position once prompt tokens with
    `positions` `[4, B, T]` (row 0 text) and `mask` `[B, T]` were fed and sequence b has seen `seen[b]`
    tokens: the next token's M-RoPE position minus its text position, constant while decoding text.
    None for a row that fed no real token."""
    mrope = positions[1:].masked_fill(~mask.bool()[None], -1)
    last = mrope.amax(dim=(0, 2)).tolist()
    return [int(value) + 1 - n if value >= 0 else None for value, n in zip(last, seen)]


def decode_positions(model, rows: list, device) -> torch.Tensor:
    """Positions of one next token per sequence (request-table rows: `seen`, `rope_delta`): `[B, 1]`
    text positions, or `[4, B, 1]` for a vision-language model (text; M-RoPE t, h, w = seen + rope delta).
    The one place decode positions are computed (transformers' `generate` derives the same from
    `model.model.rope_deltas`, which `prefill` sets)."""
    text = torch.tensor([row.seen for row in rows], dtype=torch.long, device=device)[:, None]
    if not is_vision_language(model):
        return text
    mrope = torch.tensor([row.seen + row.rope_delta for row in rows], dtype=torch.long, device=device)
    return torch.cat([text[None], mrope[None, :, None].expand(3, -1, 1)], 0)


def with_input_defaults(inputs, device) -> dict:
    """`inputs` with `input_ids`, `attention_mask` (default: no padding) and `mm_token_type_ids` (default:
    all text) on `device`: the one place these defaults are written."""
    ids = inputs["input_ids"].to(device)
    mask, types = inputs.get("attention_mask"), inputs.get("mm_token_type_ids")
    return dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask.to(device),
                mm_token_type_ids=torch.zeros_like(ids) if types is None else types.to(device))


@torch.no_grad()
def prefill(model, inputs, cache: DBTrimKVCache, chunk: int | None = None, upto: int | None = None,
            progress: bool | Callable[[int, int], None] = False) -> torch.Tensor:
    """Feed the new tokens of `inputs` (columns `[0, upto)`) to the model in chunks, evicting as it goes.

    `inputs`: processor outputs for tokens the cache has not seen (input_ids, attention_mask,
    mm_token_type_ids, pixel values, grids). Returns the logits of the last processed column `[B, V]`.
    """
    chunk = chunk or cache.config.prefill_chunk
    inputs = with_input_defaults(inputs, next(model.parameters()).device)
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    upto = ids.shape[1] if upto is None else upto
    positions = _new_token_positions(model, cache, inputs, mask)
    lm = language_model_of(model)
    embed = model.get_input_embeddings()
    stream = VisionStream(model, inputs, types, mask) if is_vision_language(model) else None
    report = _progress(progress, upto, chunk)
    with whole_prompt_rotary(model, int(positions.max()) if positions.numel() else 0):
        hidden = _prefill_chunks(model, lm, embed, ids, mask, types, positions, stream, cache, chunk, upto, report)
    _finish_positions(model, cache, positions[..., :upto], mask[:, :upto])
    return model.get_output_embeddings()(hidden) if hidden is not None else None


def _prefill_chunks(model, lm, embed, ids, mask, types, positions, stream, cache, chunk, upto, report):
    """The chunk loop of `prefill`; returns the last hidden state `[B, hidden]` (None if nothing ran)."""
    batch, device, hidden = ids.shape[0], ids.device, None
    for start in range(0, upto, chunk):
        end = min(start + chunk, upto)
        embeds = embed(ids[:, start:end])
        kwargs = {}
        if stream is not None:
            vmask, vembeds, deepstack = stream.chunk_features(start, end, batch, embeds.shape[-1], device, embeds.dtype)
            if vmask is not None:
                embeds = embeds.masked_scatter(vmask[..., None], vembeds)
                kwargs = {"visual_pos_masks": vmask, "deepstack_visual_embeds": deepstack}
        history = torch.ones(batch, cache.get_seq_length(), dtype=mask.dtype, device=device)
        cache.set_next_modality(types[:, start:end])
        out = lm(inputs_embeds=embeds, attention_mask=torch.cat([history, mask[:, start:end]], 1),
                 position_ids=positions[..., start:end], use_cache=True, **cache_kwargs(cache), **kwargs)
        hidden = out.last_hidden_state[:, -1]
        report(end)
    return hidden


def _finish_positions(model, cache: DBTrimKVCache, positions: torch.Tensor, mask: torch.Tensor) -> None:
    """Record how far M-RoPE runs ahead of the text position (each sequence's `rope_delta`, constant while decoding
    text) so later tokens and turns continue at `seen + rope_delta`; set the model's copy for decoding."""
    if not is_vision_language(model) or positions.shape[-1] == 0:
        return
    for b, delta in enumerate(rope_deltas(positions, mask, cache.seen)):
        if delta is not None:
            cache.set_rope_delta(b, delta)
    model.model.rope_deltas = torch.tensor(cache.requests.column("rope_delta"), device=positions.device)[:, None]


def _progress(progress, total: int, chunk: int):
    if callable(progress):
        return lambda done: progress(done, total)
    if progress and total > chunk:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="tok", desc="prefill", leave=False)
        return lambda done: (bar.update(done - bar.n), bar.close() if done >= total else None)
    return lambda done: None


def model_lock(model) -> threading.RLock:
    """One generation at a time per model: the hooks write the model's `ModelState` (the gates' last
    outputs) and `generate` writes transformers' `model.model.rope_deltas`."""
    return model_state(model).lock


@torch.no_grad()
def generate(model, inputs, cache: DBTrimKVCache, max_new_tokens: int = 64, prefill_chunk: int | None = None,
             progress: bool | Callable[[int, int], None] = False, timings: dict | None = None,
             **generate_kwargs) -> torch.Tensor:
    """Chunked prefill of `inputs` into `cache`, then `model.generate`; returns generated ids `[B, N]`.

    `inputs` are processor outputs for new tokens; if the cache already holds earlier turns, the
    new tokens are appended to them. Extra keyword arguments go to `model.generate` (do_sample,
    temperature, top_p, streamer, ...). If `timings` is a dict, it receives `prefill_seconds` and
    `decode_seconds` (the decode part includes the last prompt token's forward).
    """
    if not isinstance(cache, DBTrimKVCache):
        raise ConfigError("dbtrimkv.generate needs a DBTrimKVCache")
    _check_generate_arguments(inputs, cache, max_new_tokens, prefill_chunk)
    cache.check_model(model)
    _check_token_ids(model, inputs["input_ids"])
    with model_lock(model):
        return _generate(model, inputs, cache, max_new_tokens, prefill_chunk, progress, timings, generate_kwargs)


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
        raise ConfigError("inputs must hold input_ids of shape [batch, tokens] (see dbtrimkv.prompts.build_inputs)")
    if cache.batch_size not in (-1, ids.shape[0]):
        raise ConfigError(f"this cache holds {cache.batch_size} sequences, but the input has {ids.shape[0]}: "
                          "use a new cache for a batch of another size")


def _check_token_ids(model, ids: torch.Tensor) -> None:
    """ConfigError for ids that are not integers or lie outside the model's vocabulary (an index error deep
    inside the embedding otherwise)."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ConfigError(f"input_ids must be an integer tensor, got {ids.dtype}")
    vocab = model.get_input_embeddings().num_embeddings
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ConfigError(f"input_ids must lie in [0, {vocab - 1}] (the model's vocabulary), got values from "
                          f"{int(ids.min())} to {int(ids.max())}")


def _generate(model, inputs, cache, max_new_tokens, prefill_chunk, progress, timings, generate_kwargs):
    device = next(model.parameters()).device
    inputs = _with_pending_tokens(cache, inputs, device)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if ids.shape[1] == 0:
        raise ConfigError("the prompt is empty")
    if bool(inputs["mm_token_type_ids"][:, -1].any()):
        raise ConfigError("the prompt must end with a text token (e.g. the chat template's generation prompt)")
    processed_ids, processed_mask = cache.known_tokens(ids.shape[0], device)
    processed_ids, processed_mask = processed_ids[:, : cache.columns], processed_mask[:, : cache.columns]
    start = time.perf_counter()
    prefill(model, inputs, cache, chunk=prefill_chunk, upto=ids.shape[1] - 1, progress=progress)
    prefilled = time.perf_counter()
    full_ids = torch.cat([processed_ids, ids], 1)
    full_mask = torch.cat([processed_mask, mask], 1)
    out = model.generate(input_ids=full_ids, attention_mask=full_mask, **cache_kwargs(cache),
                         max_new_tokens=max_new_tokens, **generate_kwargs)
    sequences = out.sequences if hasattr(out, "sequences") else out
    if timings is not None:
        timings.update(prefill_seconds=prefilled - start, decode_seconds=time.perf_counter() - prefilled)
    new_mask = torch.ones(full_ids.shape[0], sequences.shape[1] - full_ids.shape[1], dtype=full_mask.dtype, device=device)
    cache.record_tokens(sequences, torch.cat([full_mask, new_mask], 1))
    return sequences[:, full_ids.shape[1]:]


def _with_pending_tokens(cache: DBTrimKVCache, inputs, device) -> dict:
    """`inputs` on `device` with defaults filled in, preceded by known tokens the cache has not processed
    (the last token of a previous `generate` call is sampled but never fed to the model)."""
    inputs = with_input_defaults(inputs, device)
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    if cache.pool is not None:
        known_ids, known_mask = cache.known_tokens(ids.shape[0], device)
        pending_ids, pending_mask = known_ids[:, cache.columns :], known_mask[:, cache.columns :]
        ids = torch.cat([pending_ids, ids], 1)
        mask = torch.cat([pending_mask, mask], 1)
        types = torch.cat([torch.zeros_like(pending_ids), types], 1)
    return dict(inputs, input_ids=ids, attention_mask=mask, mm_token_type_ids=types)
