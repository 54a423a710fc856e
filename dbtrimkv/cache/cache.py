"""`DBTrimKVCache`: a transformers `Cache` that keeps each sequence inside a fixed entry budget.

Why: users call `model.generate(..., cache=DBTrimKVCache(model, config))` (`past_key_values=` before
transformers 5.24) and expect the usual generation features, while KV memory stays bounded. This
class is the thin adapter between transformers and three roles (docs/architecture.md, "Storage"):
a `KVStore` (slot pool, slot tables, request table: what is kept, the only writer of all three),
an `AttentionBackend` (how layers write and attend: CPU views or the pool in place) and the
configured policy (which entries an eviction keeps, from a read-only `StoreView`). Everything one
forward needs lives in a `ForwardContext`, created before layer 0 and dropped after.

Bookkeeping per forward of the language model (driven by the hooks in `dbtrimkv.modeling.attention`):
1. before layer 0: read which new tokens are padding, give the real ones logical positions
   (`seen[b] + 0, 1, ...`), and if appending them would push sequence b past
   `budget + L*H*max(buffer_size, n_b)` entries, evict b down to `budget` first (scores use the
   tokens seen so far, exactly as an eviction at the end of the previous forward would); then, for
   every layer at once, take the new entries' slots, write their positions and modality and append
   them to the slot tables (no per-layer bookkeeping, no host reads after this point);
2. each layer writes its new K/V and log beta into those slots (padding never cached) and attends
   (`AttentionBackend`). A single-token forward (decode) queues the layer's gate input instead of
   running the gate: the queue's log beta is computed in one call per layer when first needed
   (`deferred_gates.py`; reading `pool` from outside completes it).
So a sequence never holds more than `budget + L*H*max(buffer_size, n)` entries, n = tokens of
the current forward (1 when decoding, the chunk size when prefilling in chunks).

`get_seq_length()` is the number of token columns processed (the logical length for an unpadded
sequence), which is what generation and Qwen-VL's M-RoPE decode positions rely on.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..settings.config import DBTrimKVConfig
from ..errors import ConfigError
from ..inputs.modality import modality_codes
from ..modeling.model_anatomy import RETENTION_ATTENTION, text_attention_name, text_config_of
from ..modeling.model_state import existing_state
from ..modeling.transformers_compat import integration_error
from .backend import AttentionBackend, uses_views
from .forward_plan import ForwardContext, ForwardPlan
from .pool import SlotPool
from .requests import ParkedSequence
from .eviction import EvictionTrigger
from .statistics import CacheStatistics
from .store import KVStore
from .token_memory import TokenMemory

__all__ = ["DBTrimKVCache", "RetentionCacheLayer", "uses_views"]


def _check_gated(model) -> None:
    """ConfigError unless `model` is a transformers model with dbtrimkv's retention gates attached."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ConfigError(f"DBTrimKVCache needs a transformers model (from dbtrimkv.load_model), got "
                          f"{type(model).__name__}")
    state = existing_state(model)
    if text_attention_name(model) != RETENTION_ATTENTION or state is None or state.gate_spec is None:
        raise ConfigError(
            "this model has no retention gates: call dbtrimkv.attach_retention_gates(model) or load it "
            "with dbtrimkv.load_model(...) before creating a DBTrimKVCache"
        )


def _kv_shape(model) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of the model's language model."""
    text = text_config_of(model)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return text.num_hidden_layers, text.num_key_value_heads, head_dim


class RetentionCacheLayer(CacheLayerMixin):
    """Per-layer view for transformers' generic cache code; storage lives in the parent cache."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, parent: "DBTrimKVCache", layer_idx: int):
        super().__init__()
        self.parent, self.layer_idx = parent, layer_idx

    def lazy_initialization(self, key_states, value_states) -> None:  # storage is the parent's pool
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.parent.update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.parent.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.parent.get_seq_length()

    def get_max_length(self) -> int:
        return -1


class DBTrimKVCache(CacheStatistics, Cache):
    """Bounded KV cache over a slot pool; see the module docstring."""

    def __init__(self, model, config: DBTrimKVConfig | None = None):
        config = config if config is not None else DBTrimKVConfig()
        if not isinstance(config, DBTrimKVConfig):
            raise ConfigError(f"config must be a DBTrimKVConfig, got {type(config).__name__}")
        _check_gated(model)
        layers, kv_heads, head_dim = _kv_shape(model)
        policy = config.build_policy()  # this cache's own instance (its state is the cache's)
        budget = config.resolve_budget(layers, kv_heads, policy)
        ids = (getattr(model.config, "image_token_id", None), getattr(model.config, "video_token_id", None))
        self._assemble(config, policy, budget, ids, KVStore(layers, kv_heads, head_dim, config))

    def check_model(self, model) -> None:
        """ConfigError unless `model` has retention gates and the KV shape this cache was built for."""
        _check_gated(model)
        shape = _kv_shape(model)
        if shape != (self.num_layers, self.num_kv_heads, self.head_dim):
            raise ConfigError(
                "this DBTrimKVCache was built for another model ({} layers x {} KV heads x head dim {}; this model "
                "has {} x {} x {}): create the cache with DBTrimKVCache(model, config) for the model that uses it"
                .format(self.num_layers, self.num_kv_heads, self.head_dim, *shape))

    def _assemble(self, config, policy, budget, token_ids, store: KVStore, backend: AttentionBackend | None = None,
                  tokens: TokenMemory | None = None, counters: tuple[int, int, int] = (0, 0, 0)) -> None:
        """Set every field from its parts (construction, `reset`, `clone`)."""
        self.config, self.policy, self.budget = config, policy, budget
        self.image_token_id, self.video_token_id = token_ids
        self.num_layers, self.num_kv_heads, self.head_dim = store.num_layers, store.num_kv_heads, store.head_dim
        self.store = store
        self.backend = backend if backend is not None else AttentionBackend(store, config.buffer_size)
        self.tokens = tokens if tokens is not None else TokenMemory()
        self.columns = counters[0]  # token columns processed, padding included
        self.eviction = EvictionTrigger(config, policy, budget, store, counters[1:])
        self.forward: ForwardContext | None = None  # the current (or last) forward
        self._pending_modality: torch.Tensor | None = None  # `[B, T]` codes of the next forward's tokens
        Cache.__init__(self, layers=[RetentionCacheLayer(self, i) for i in range(self.num_layers)])
        if store.ready:
            for layer in self.layers:
                layer.is_initialized = True

    def reset(self) -> None:
        self.policy.reset()
        self._assemble(self.config, self.policy, self.budget, (self.image_token_id, self.video_token_id),
                       KVStore(self.num_layers, self.num_kv_heads, self.head_dim, self.config))

    def clone(self) -> "DBTrimKVCache":
        """An independent copy (e.g. to ask several questions about one compressed video); per-forward
        state is not part of it, the CPU views are rebuilt from the copied pool on its next forward."""
        other = object.__new__(DBTrimKVCache)
        store = self.store.clone()
        other._assemble(self.config, self.policy.clone(), self.budget, (self.image_token_id, self.video_token_id),
                        store, self.backend.clone(store), self.tokens.clone(),
                        (self.columns, self.num_evictions, self.evicted_entries))
        return other

    # --- the roles' state, read-only ---------------------------------------------------------------
    pool = property(lambda self: self.store.completed_pool(), doc="the slot pool, deferred gates run first")
    has_pool = property(lambda self: self.store.ready, doc="whether the pool exists (after the first forward or use_pool)")
    tables = property(lambda self: self.store.tables)
    requests = property(lambda self: self.store.requests)
    device = property(lambda self: self.store.device)
    views = property(lambda self: self.backend.views)
    views_limit = property(lambda self: self.backend.views_limit)
    views_skipped = property(lambda self: self.backend.views_skipped)
    policy_scores = property(lambda self: self.policy.scores, doc="per-slot scores a baseline policy keeps")
    plan = property(lambda self: self.forward.plan if self.forward is not None else None)
    num_evictions = property(lambda self: self.eviction.num_evictions)
    evicted_entries = property(lambda self: self.eviction.evicted_entries)

    def _initialize(self, batch_size: int, device, dtype, pool: SlotPool | None = None) -> None:
        self.store.initialize(batch_size, device, dtype, pool)
        self.backend.bind_pool()
        for layer in self.layers:
            layer.is_initialized = True

    # --- sequences and settings ---------------------------------------------------------------------
    def use_pool(self, pool: SlotPool) -> None:
        """Keep this cache's entries in `pool`, which other caches may share (a server's one bounded
        pool). Call before the first forward; the cache then starts with no sequences."""
        if self.store.pool is not None:
            raise RuntimeError("use_pool must be called before the cache's first forward")
        self._initialize(0, pool.device, pool.dtype, pool)

    def add_sequence(self, parked: ParkedSequence | None = None) -> int:
        """Add a sequence as the last batch row of a live cache; returns its row. Empty by default, or
        a `parked` one (from `park_sequence` on a cache with the same pool), whose entries come back
        without copying. The others' entries and bookkeeping are untouched; the next forward's input
        must have one more row."""
        self._check_between_forwards("add a sequence")
        row = self.store.add_sequence(parked)
        self.tokens.add_row()
        return row

    def remove_sequence(self, row: int) -> None:
        """Retire batch row `row`: its slots go back to the pool's free list, the rows after it move up
        by one; the other sequences' entries and bookkeeping are untouched."""
        self.store.release(self.park_sequence(row))

    def park_sequence(self, row: int) -> ParkedSequence:
        """Take batch row `row` out like `remove_sequence`, but keep its slots allocated: the returned
        sequence can be added back later (to this cache or another one on the same pool)."""
        self._check_between_forwards("remove a sequence")
        parked = self.store.park_sequence(row)
        self.tokens.remove_row(row)
        return parked

    def set_rope_delta(self, row: int, delta: int) -> None:
        """Sequence `row`'s M-RoPE position of its next token minus its text position (Qwen-VL)."""
        self.store.set_rope_delta(row, delta)

    def set_views_limit(self, limit: int | None) -> None:
        """Most bytes the CPU attention views may take (None: no limit); see `AttentionBackend`."""
        self.backend.set_views_limit(limit)

    def attend_through_pool(self) -> None:
        """Never keep CPU views: attend through the slot tables (`kernels/ragged_attention/naive.py` on CPU)."""
        self.backend.drop_views()

    def clear_columns(self) -> None:
        """Forget the column count: the next forward's rows share none (a serving batch, whose rows
        carry explicit positions)."""
        self.columns = 0

    def restore_counters(self, columns: int, num_evictions: int, evicted_entries: int) -> None:
        """Column and eviction counts of a saved cache read back (`cache/portable.py`)."""
        self._check_between_forwards("restore counters")
        self.columns = columns
        self.eviction.restore_counts(num_evictions, evicted_entries)

    def _check_between_forwards(self, action: str) -> None:
        if self.forward is not None and self.forward.staged:
            raise RuntimeError(f"cannot {action} in the middle of a forward")
        self.forward = None
        self.backend.invalidate()

    # --- hooks --------------------------------------------------------------------------------
    def note_input_ids(self, input_ids: torch.Tensor, images: bool = True, videos: bool = True) -> None:
        """Remember the modality of the next forward's tokens (from the image / video token ids; `images` /
        `videos` False: this forward has no such pixels, so those ids are text, e.g. generated ones)."""
        self._pending_modality = modality_codes(input_ids, self.image_token_id if images else None,
                                                self.video_token_id if videos else None)

    def set_next_modality(self, modality: torch.Tensor) -> None:
        """`Modality` codes of the next forward's tokens, `[B, T]`."""
        self._pending_modality = modality.to(torch.int8)

    def stage(self, layer_idx: int, gate, hidden_states: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor | None:
        """Called by the attention pre-hook with the layer's attention input `[B, T, d]` and its `gate`
        (hidden -> log beta `[..., H]`). Returns the gate's output, or None when this forward's gates
        are deferred (a single-token forward: `deferred_gates.py`)."""
        if layer_idx == 0:
            self._begin_forward(hidden_states.shape[0], hidden_states.shape[1], padding, hidden_states.device,
                                hidden_states.dtype)
        return self.store.gates.stage(self.forward, layer_idx, gate, hidden_states)

    def _begin_forward(self, batch: int, length: int, padding: torch.Tensor | None, device, kv_dtype: torch.dtype) -> None:
        store = self.store
        if store.pool is None and len(self.requests) in (0, batch):
            self._initialize(batch, device, kv_dtype)
        elif batch != len(self.requests):
            raise ConfigError(f"this cache holds {len(self.requests)} sequences, but the input has {batch}")
        if store.gates.full:
            store.complete_log_beta()
        device = self.device
        valid = None if padding is None or bool(padding.all()) else padding.to(device)  # None: no padding
        counts = [length] * batch if valid is None else valid.sum(1).tolist()
        modality, self._pending_modality = self._pending_modality, None
        if modality is None or tuple(modality.shape) != (batch, length):
            modality = torch.zeros(batch, length, dtype=torch.int8, device=device)
        due = self.eviction.due(counts)
        if due:
            self.evict(due)
        seen, modality = self.requests.seen_tensor(device), modality.to(device)
        plan = ForwardPlan.unpadded(batch, length, seen, modality) if valid is None else \
            ForwardPlan.build(valid, seen, modality)
        self.store.reserve_forward(plan, counts, self.eviction.pool_limit(counts),
                                   headroom=max(self.config.buffer_size, max(counts, default=0)))
        self.columns += length
        views_now = self.backend.prepare(plan, decode=length == 1)  # before the new entries are placed
        self.forward = ForwardContext(plan, self.store.place_new_entries(plan), any(n != length for n in counts),
                                      self.policy.observed_queries(plan), views_now)

    # --- eviction -------------------------------------------------------------------------------
    @torch.no_grad()
    def evict(self, sequences: list[int] | None = None) -> int:
        """Shrink the given sequences (default: all) to their budget (and, for the threshold policy, drop
        every entry below tau) now; returns entries evicted."""
        if not self.eviction.evicts or self.store.pool is None:
            return 0
        evicted = self.eviction.evict(list(range(len(self.requests))) if sequences is None else list(sequences))
        self.backend.invalidate()
        return evicted

    # --- positions and tokens ------------------------------------------------------------------------
    def next_mrope_positions(self, batch: int) -> list[int]:
        """The M-RoPE position the next token of each sequence gets (its text position + rope delta)."""
        if self.store.pool is None:
            return [0] * batch
        return [row.seen + row.rope_delta for row in self.requests]

    def record_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Remember every token id of the conversation so far (processed or still pending)."""
        self.tokens.record(ids, mask)

    def known_tokens(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of the conversation so far (`TokenMemory.known`)."""
        return self.tokens.known(batch, self.columns, device)

    # --- transformers Cache API ----------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append the real (non-padding) tokens' K/V of one layer to the pool; returns the inputs."""
        forward = self.forward
        if forward is None or layer_idx not in forward.staged:
            raise integration_error(
                "the attention called DBTrimKVCache.update without running the retention pre-hook first "
                "(attach gates with dbtrimkv.attach_retention_gates or load the model with dbtrimkv.load_model; "
                "if they are attached, the attention no longer hands its cache to the hook)"
            )
        self.backend.write(forward, layer_idx, key_states, value_states, forward.staged.pop(layer_idx))
        return key_states, value_states

    def attend(self, layer_idx: int, query: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of this forward's queries `[B, Hq, T, D]` over the layer's cached entries.
        (`plan.query_positions` gives their logical positions, -1 for padding.) A policy that reads
        attention statistics gets them here (`attention_stats`)."""
        return self.backend.attend(self.forward, layer_idx, query, scale, self._observe)

    def _observe(self, layer_idx, attention) -> None:
        self.policy.observe_attention(self.eviction.view, layer_idx, attention)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.columns + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor):
        raise NotImplementedError("beam search is not supported with DBTrimKVCache; use greedy or sampling")

    def batch_repeat_interleave(self, repeats: int):
        if repeats != 1:
            raise NotImplementedError("num_return_sequences > 1 is not supported with DBTrimKVCache")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("DBTrimKVCache cannot be cropped (evicted entries are gone)")
