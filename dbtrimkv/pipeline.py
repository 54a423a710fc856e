"""`DBTrimKVPipeline`: chat about images, videos and long documents inside a KV budget.

Why: this is what a user touches first. One object loads the model (released checkpoint, our
gates, or a plain model), builds inputs from chat messages, prefills long prompts in chunks with
eviction (a progress bar when long), generates (optionally streaming), and reports what the
budget bought: prompt tokens by modality, entries kept by modality, KV bytes used against what a
full cache would use, timings and evictions. A `Conversation` keeps the bounded cache between
turns, so a new user turn is appended without re-prefilling the history.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .cache import DBTrimKVCache
from .cache.portable import load_cache, save_cache
from .loading.checkpoints import load_model
from .settings.config import DBTrimKVConfig
from .errors import CacheFileError, ConfigError
from .settings.eviction_settings import resolve_eviction
from .generation import generate
from .inputs.prompts import VideoOptions, build_inputs, is_multimodal, tokenizer_of, tokens_by_modality
from .reporting.stats_text import budget_words, entry_line, eviction_line, format_bytes, kv_bound, storage_line
from .runner.pending import pending_ids
from .runner.text import TextStream, TextTracker
from .stop_strings import stop_strings
from .inputs.turns import closing_ids, prepend_tokens, stop_token_ids


@dataclass
class GenerationStats:
    """What one generation cost and kept (one sequence).

    Units (`dbtrimkv.reporting.stats_text` words them for people): an entry is one token's K and V in one
    (layer, KV head), so a token costs `layers * kv_heads` entries. `kv_entries` is what the cache
    holds now (after the answer), `peak_kv_entries` the most it held, `kv_entries_full` what a
    never-evicting cache would hold. Eviction is lazy: the cache is cut back to `budget` only just
    before a forward would pass `kv_bound` = budget + layers x KV heads x max(buffer_size,
    prefill_chunk), so `kv_entries` may exceed `budget` with no eviction yet. `kv_bytes` /
    `kv_bytes_full` are the bytes those entries use; `kv_storage_bytes` is what the pool has
    allocated (it grows ahead of use, never past the bound), which may exceed both.
    """

    prompt_tokens: dict[str, int]
    new_tokens: int
    retained_entries: dict[str, int]
    kv_entries: int
    kv_entries_full: int
    kv_bytes: int
    kv_bytes_full: int
    kv_storage_bytes: int
    peak_kv_entries: int
    prefill_seconds: float
    decode_seconds: float
    evictions: int
    budget: int | None
    policy: str
    notes: list[str] = field(default_factory=list)  # e.g. how a long video's frames were sampled
    layers: int = 0
    kv_heads: int = 0
    buffer_size: int = 0
    prefill_chunk: int = 0
    kv_bound: int | None = None  # most entries the sequence may hold (None: no budget)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def kv_fraction(self) -> float:
        """Entries kept / entries a full cache would hold."""
        return self.kv_entries / self.kv_entries_full if self.kv_entries_full else 1.0

    def to_dict(self) -> dict:
        return dict(asdict(self), tokens_per_second=self.tokens_per_second, kv_fraction=self.kv_fraction,
                    explanation=self.explanation())

    @property
    def entry_bytes(self) -> int:
        return self.kv_bytes_full // self.kv_entries_full if self.kv_entries_full else 0

    def explanation(self) -> list[str]:
        """What the numbers mean: what an entry is, when eviction runs and the bound, storage allocated vs used."""
        lines = [entry_line(self.layers, self.kv_heads),
                 eviction_line(self.budget, self.policy, self.layers, self.kv_heads, self.buffer_size,
                               self.prefill_chunk, now=self.kv_entries)] if self.layers else []
        if self.entry_bytes:
            lines.append(storage_line(self.kv_storage_bytes, self.kv_bytes, self.entry_bytes))
        return lines

    def summary(self) -> str:
        """Several lines: tokens and timings; entries now / peak / full, by modality, the budget; the
        explanation lines; notes."""
        p, r = self.prompt_tokens, self.retained_entries
        return (
            f"prompt tokens: {sum(p.values())} (text {p['text']}, image {p['image']}, video {p['video']}) | "
            f"new tokens: {self.new_tokens} | prefill {self.prefill_seconds:.2f} s, decode {self.decode_seconds:.2f} s "
            f"({self.tokens_per_second:.1f} tok/s)\n"
            f"KV cache: {self.kv_entries} entries kept of {self.kv_entries_full} for a full cache "
            f"({format_bytes(self.kv_bytes)} of {format_bytes(self.kv_bytes_full)}, {100 * self.kv_fraction:.1f}%), "
            f"peak {self.peak_kv_entries} | kept by modality: text {r['text']}, image {r['image']}, video {r['video']} | "
            f"policy {self.policy}, {budget_words(self.budget, self.policy)}, evictions {self.evictions}"
        ) + "".join(f"\n  {line}" for line in self.explanation()) + "".join(f"\nnote: {note}" for note in self.notes)


@dataclass
class PipelineOutput:
    text: str
    stats: GenerationStats
    token_ids: list[int] = field(default_factory=list)
    cache: DBTrimKVCache | None = field(default=None, repr=False)  # what was kept, for retention maps
    batch_index: int = 0


def collect_stats(cache: DBTrimKVCache, inputs, b: int, new_tokens: int, timings: dict,
                  evictions_before: int = 0) -> GenerationStats:
    per_entry = cache.entry_bytes()
    kept, full = cache.num_entries(b), cache.full_cache_entries(b)
    return GenerationStats(
        prompt_tokens=tokens_by_modality(inputs, b), new_tokens=new_tokens,
        retained_entries=cache.retained_by_modality(b), kv_entries=kept, kv_entries_full=full,
        kv_bytes=kept * per_entry, kv_bytes_full=full * per_entry, kv_storage_bytes=cache.storage_bytes(),
        peak_kv_entries=cache.peak_entries[b] if cache.peak_entries else 0,
        prefill_seconds=timings.get("prefill_seconds", 0.0), decode_seconds=timings.get("decode_seconds", 0.0),
        evictions=cache.num_evictions - evictions_before, budget=cache.budget, policy=cache.config.policy,
        layers=cache.num_layers, kv_heads=cache.num_kv_heads, buffer_size=cache.config.buffer_size,
        prefill_chunk=cache.config.prefill_chunk,
        kv_bound=kv_bound(cache.budget, cache.num_layers, cache.num_kv_heads, cache.config.buffer_size,
                          cache.config.prefill_chunk),
    )


class StreamingOutput:
    """Iterate to receive text pieces as they are generated; `.text` / `.stats` are set at the end."""

    def __init__(self, pieces: Iterator[str], finish):
        self._pieces, self._finish = pieces, finish
        self.text, self.stats = "", None

    def __iter__(self) -> Iterator[str]:
        for piece in self._pieces:
            self.text += piece
            yield piece
        self.stats = self._finish()


class DBTrimKVPipeline:
    """Load once, then call with chat messages (see the module docstring)."""

    def __init__(self, model, processor, config: DBTrimKVConfig | str | Path | None = None,
                 video: VideoOptions | None = None):
        """`config`: eviction settings (a DBTrimKVConfig, a YAML/JSON path or a preset name), applied
        on top of the model's saved default by `dbtrimkv.settings.eviction_settings`."""
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model must be a loaded model (e.g. from dbtrimkv.load_model), got {type(model).__name__}")
        if not hasattr(tokenizer_of(processor), "apply_chat_template"):
            raise ConfigError(f"processor must be the model's processor or tokenizer, got {type(processor).__name__}")
        if video is not None and not isinstance(video, VideoOptions):
            raise ConfigError(f"video must be a VideoOptions (or None for the defaults), got {type(video).__name__}")
        self.model, self.processor = model, processor
        self.config = resolve_eviction(model, _checked_source(config))
        self.video = video or VideoOptions()

    @classmethod
    def from_pretrained(cls, name_or_path=None, budget: int | None = None, memory_size: int | None = None,
                        policy: str | None = None, device=None, dtype=None, config=None, threshold: float | None = None,
                        policy_options: dict | None = None, **kwargs) -> "DBTrimKVPipeline":
        """Load a model and resolve its eviction settings: the model's saved default, then `config` (a
        DBTrimKVConfig, a YAML/JSON path or a preset name), then the keyword settings you set (None:
        not set), by the rule of `dbtrimkv.settings.eviction_settings`."""
        source = _checked_source(config)  # before the (slow) load
        model, processor = load_model(name_or_path, device=device, dtype=dtype)
        resolved = resolve_eviction(model, source, budget=budget, memory_size=memory_size, policy=policy,
                                    threshold=threshold, policy_options=policy_options)
        return cls(model, processor, resolved, **kwargs)

    @property
    def tokenizer(self):
        return tokenizer_of(self.processor)

    def new_cache(self, config: DBTrimKVConfig | None = None) -> DBTrimKVCache:
        return DBTrimKVCache(self.model, config or self.config)

    def build_inputs(self, messages, add_generation_prompt: bool = True, notes: list | None = None,
                     continue_final_message: bool = False):
        return build_inputs(self.processor, messages, add_generation_prompt=add_generation_prompt, video=self.video,
                            notes=notes, continue_final_message=continue_final_message)

    def _generation_kwargs(self, do_sample, temperature, top_p, max_new_tokens):
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
        if do_sample:
            kwargs.update({k: v for k, v in (("temperature", temperature), ("top_p", top_p)) if v is not None})
        else:  # silence checkpoint sampling defaults when decoding greedily
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def __call__(self, messages, max_new_tokens: int = 128, do_sample: bool = False, temperature: float | None = None,
                 top_p: float | None = None, stream: bool = False, progress: bool = True,
                 continue_final_message: bool = False, stop=None):
        """Answer one chat (a list of messages or a string) or a batch (a list of chats).

        `continue_final_message`: the chats end with the start of the assistant's answer, which the
        model continues (no new assistant turn is opened). `stop`: a string or list of strings that ends
        a row's answer as soon as its text holds one; the text ends just before it (`dbtrimkv.stop_strings`).
        Returns a `PipelineOutput` (a list of them for a batch), or a `StreamingOutput` if `stream`.
        """
        stops = stop_strings(stop)
        batched = isinstance(messages, list) and bool(messages) and not isinstance(messages[0], dict) \
            and not isinstance(messages, str)
        notes: list[str] = []
        inputs = self.build_inputs(messages, notes=notes, add_generation_prompt=not continue_final_message,
                                   continue_final_message=continue_final_message)
        cache = self.new_cache()
        kwargs = self._generation_kwargs(do_sample, temperature, top_p, max_new_tokens)
        if stream:
            if inputs["input_ids"].shape[0] != 1:
                raise ConfigError("stream=True takes one conversation, not a batch")
            return self._stream(inputs, cache, kwargs, progress, notes=notes, stops=stops)
        trackers = [TextTracker(self.tokenizer, stops) for _ in range(inputs["input_ids"].shape[0])] if stops else None
        outputs = self._run(inputs, cache, kwargs, progress, notes=notes, trackers=trackers)
        return outputs if batched else outputs[0]

    def chat(self, text: str, images=(), videos=(), **kwargs):
        """Convenience: one user turn with optional images / videos (paths, PIL images or frame lists)."""
        return self(user_message(text, images, videos), **kwargs)

    def conversation(self, system: str | None = None) -> "Conversation":
        return Conversation(self, system=system)

    def load_conversation(self, path) -> "Conversation":
        """A conversation saved by `Conversation.save`, continued on this pipeline's model (the file is
        checked against it; `CacheFileError` / `CacheMismatchError` name what does not match)."""
        cache, extra = load_cache(self.model, path)
        if extra.get("kind") != "conversation":
            raise CacheFileError(f"{path} holds a {extra.get('kind', 'bare')} cache, not a saved conversation")
        conversation = Conversation(self)
        conversation.cache, conversation.messages = cache, list(extra["messages"])
        return conversation

    def _run(self, inputs, cache: DBTrimKVCache, kwargs, progress, evictions_before: int = 0,
             notes: list[str] = (), trackers: list[TextTracker] | None = None) -> list[PipelineOutput]:
        """Generate; `trackers` (one per row): each row ends once its text holds a stop string, and its
        answer is the tracker's text, cut before it."""
        timings: dict = {}
        if trackers is not None:
            kwargs = dict(kwargs, done=[tracker.done for tracker in trackers])
        with torch.inference_mode():
            new = generate(self.model, inputs, cache, progress=progress, timings=timings, **kwargs)
        outputs, stop = [], stop_token_ids(self.model, self.tokenizer)
        for b in range(new.shape[0]):
            if trackers is not None and trackers[b].stopped:  # ids up to the token that completed the stop string
                ids, text = list(trackers[b].ids), trackers[b].text
            else:
                ids = _strip_padding(new[b], stop)
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
            stats = collect_stats(cache, inputs, b, len(ids), timings, evictions_before)
            stats.notes = list(notes)
            outputs.append(PipelineOutput(text, stats, ids, cache=cache, batch_index=b))
        return outputs

    def _stream(self, inputs, cache: DBTrimKVCache, kwargs, progress, evictions_before: int = 0,
                on_done=None, notes: list[str] = (), stops: tuple[str, ...] = ()) -> StreamingOutput:
        """The answer's text pieces as they come (never a stop string, nor the start of one that may still
        complete), from generation in a thread; its stats when the pieces end."""
        tracker = TextTracker(self.tokenizer, stops)
        streamer = TextStream(tracker)
        result: dict = {}

        def work():
            try:
                result["outputs"] = self._run(inputs, cache, dict(kwargs, streamer=streamer), progress,
                                              evictions_before, notes, [tracker])
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer thread
                result["error"] = exc
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()

        def finish():
            thread.join()
            if "error" in result:
                raise result["error"]
            out = result["outputs"][0]
            if on_done is not None:
                on_done(out)
            return out.stats

        return StreamingOutput(iter(streamer), finish)


def user_message(text: str, images=(), videos=()) -> list[dict]:
    parts = [{"type": "image", "image": image} for image in _as_list(images)]
    parts += [{"type": "video", "video": video} for video in _as_list(videos)]
    parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


def _as_list(media) -> list:
    """`images=` / `videos=` as a list: one path, bytes or picture is a list of one; None is empty."""
    if media is None:
        return []
    if isinstance(media, (str, bytes, bytearray, Path)) or not isinstance(media, (list, tuple)):
        return [media]
    return list(media)


def _strip_padding(ids: torch.Tensor, stop: set[int]) -> list[int]:
    """Generated ids up to and including the first end-of-sequence token."""
    out = []
    for token in ids.tolist():
        out.append(token)
        if token in stop:
            break
    return out


def _without_media(message: dict) -> dict:
    """A chat message as JSON: text parts kept, image / video parts reduced to their type."""
    content = message["content"]
    if isinstance(content, list):
        content = [part if part.get("type") == "text" else {"type": part.get("type")} for part in content]
    return {"role": message["role"], "content": content}


def _checked_source(config):
    if config is not None and not isinstance(config, (DBTrimKVConfig, str, Path)):
        raise ConfigError(f"config must be a DBTrimKVConfig, a YAML/JSON path or a preset, got {type(config).__name__}")
    return config


class Conversation:
    """A multi-turn chat whose KV cache persists (bounded) between turns."""

    def __init__(self, pipeline: DBTrimKVPipeline, system: str | None = None):
        self.pipeline = pipeline
        self.cache = pipeline.new_cache()
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []

    def _turn_inputs(self, message: list[dict], notes: list | None = None):
        """Inputs for the new turn only, prefixed with what closes the previous assistant turn (after the
        reply's pending token, which the cache's row keeps and `generate` feeds first)."""
        pipe = self.pipeline
        replied = any(m["role"] == "assistant" for m in self.messages)
        inputs = pipe.build_inputs(([] if replied else self.messages) + message, notes=notes)
        if not replied:
            return inputs
        stop = stop_token_ids(pipe.model, pipe.tokenizer)
        return prepend_tokens(inputs, closing_ids(pipe.tokenizer, pending_ids(self.cache.requests[0]), stop))

    def send(self, text: str, images=(), videos=(), max_new_tokens: int = 128, do_sample: bool = False,
             temperature: float | None = None, top_p: float | None = None, stream: bool = False, progress: bool = True):
        """Add a user turn and answer it; returns a `PipelineOutput` (or a `StreamingOutput`)."""
        pipe = self.pipeline
        if (images or videos) and not is_multimodal(pipe.processor):
            raise ConfigError("this model is text-only: it cannot take images or videos")
        message = user_message(text, images, videos)
        notes: list[str] = []
        inputs = self._turn_inputs(message, notes)
        kwargs = pipe._generation_kwargs(do_sample, temperature, top_p, max_new_tokens)
        before = self.cache.num_evictions

        def record(out: PipelineOutput):
            self.messages += message + [{"role": "assistant", "content": out.text}]

        if stream:
            return pipe._stream(inputs, self.cache, kwargs, progress, before, on_done=record, notes=notes)
        out = pipe._run(inputs, self.cache, kwargs, progress, before, notes)[0]
        record(out)
        return out

    def save(self, path) -> int:
        """Write the compressed cache and the turns so far to `path` (`cache/portable.py` format; media
        are not stored, only where they were); returns the file's size in bytes."""
        extra = {"kind": "conversation", "messages": [_without_media(m) for m in self.messages]}
        return save_cache(self.pipeline.model, self.cache, path, extra)

    @property
    def turns(self) -> int:
        return sum(1 for m in self.messages if m["role"] == "user")


__all__ = ["Conversation", "DBTrimKVPipeline", "GenerationStats", "PipelineOutput", "StreamingOutput"]
