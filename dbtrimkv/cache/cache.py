"""`DBTrimKVCache`: a transformers `Cache` that keeps each sequence inside a fixed entry budget.

Why: users call `model.generate(..., cache=DBTrimKVCache(model, config))` (`past_key_values=` before
transformers 5.24) and expect the
usual generation features, while KV memory stays bounded. The cache stores entries in a
`SlotPool` with per-segment `SlotTables` (docs/architecture.md, "Storage") and evicts by the
configured policy (docs/architecture.md, "Eviction contract"). Per-sequence bookkeeping lives in a
`RequestTable` (one row per sequence, added and removed with `add_sequence` / `remove_sequence`),
the per-forward token layout in a `ForwardPlan`.

Bookkeeping per forward of the language model (driven by the hooks in `dbtrimkv.attention`):
1. before layer 0: read which new tokens are padding, give the real ones logical positions
   (`seen[b] + 0, 1, ...`), and if appending them would push sequence b past
   `budget + L*H*max(buffer_size, n_b)` entries, evict b down to `budget` first (scores use the
   tokens seen so far, exactly as an eviction at the end of the previous forward would); then, for
   every layer at once, take the new entries' slots, write their positions and modality and append
   them to the slot tables (no per-layer bookkeeping, no host reads after this point);
2. each layer writes its new K/V and log beta into those slots (padding never cached) and attends:
   on CUDA through the slot tables (Triton kernels), on CPU over `KVViews`, contiguous per-layer
   copies of the cached K/V that only an eviction or a multi-token forward makes stale
   (`view_attention.py`: the cached entries need no causal mask, only the new tokens do). The views
   are a second copy of the kept entries: `views_limit` caps their bytes (a server sizes pool and
   views together); a forward whose views would exceed it attends through the slot tables instead
   (the torch reference kernel: same contract, no copy kept).
So a sequence never holds more than `budget + L*H*max(buffer_size, n)` entries, n = tokens of
the current forward (1 when decoding, the chunk size when prefilling in chunks).

`get_seq_length()` is the number of token columns processed (the logical length for an unpadded
sequence), which is what generation and Qwen-VL's M-RoPE decode positions rely on.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..config import DBTrimKVConfig
from ..errors import ConfigError
from ..kernels import ragged_attention
from ..kernels.dispatch import backend_for
from ..modality import MODALITY_NAMES, Modality
from ..model_anatomy import RETENTION_ATTENTION, text_attention_name, text_config_of
from ..model_state import existing_state
from ..transformers_compat import integration_error
from .attention_stats import from_decode_views, from_pool, from_views
from .forward_plan import ForwardPlan
from .pool import SlotPool
from .requests import ParkedSequence, RequestTable
from .tables import SlotTables
from .view_attention import attend_view, attend_view_and_new, attend_view_with_mass, attention_mass
from .views import KVViews


def uses_views(pool_tensor: torch.Tensor) -> bool:
    """Does a cache whose pool holds tensors like this attend over `KVViews` (CPU, torch kernels)?"""
    return pool_tensor.device.type == "cpu" and backend_for(pool_tensor) == "torch"


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


class DBTrimKVCache(Cache):
    """Bounded KV cache over a slot pool; see the module docstring."""

    def __init__(self, model, config: DBTrimKVConfig | None = None):
        self.config = config if config is not None else DBTrimKVConfig()
        if not isinstance(self.config, DBTrimKVConfig):
            raise ConfigError(f"config must be a DBTrimKVConfig, got {type(self.config).__name__}")
        _check_gated(model)
        self.num_layers, self.num_kv_heads, self.head_dim = _kv_shape(model)
        self.policy = self.config.build_policy()  # this cache's own instance (its state is the cache's)
        self.budget = self.config.resolve_budget(self.num_layers, self.num_kv_heads, self.policy)
        config_ids = model.config
        self.image_token_id = getattr(config_ids, "image_token_id", None)
        self.video_token_id = getattr(config_ids, "video_token_id", None)
        super().__init__(layers=[RetentionCacheLayer(self, i) for i in range(self.num_layers)])
        self._reset_state()

    def check_model(self, model) -> None:
        """ConfigError unless `model` has retention gates and the KV shape this cache was built for."""
        _check_gated(model)
        shape = _kv_shape(model)
        if shape != (self.num_layers, self.num_kv_heads, self.head_dim):
            raise ConfigError(
                "this DBTrimKVCache was built for another model ({} layers x {} KV heads x head dim {}; this model "
                "has {} x {} x {}): create the cache with DBTrimKVCache(model, config) for the model that uses it"
                .format(self.num_layers, self.num_kv_heads, self.head_dim, *shape))

    # --- state -------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.pool: SlotPool | None = None
        self.tables: SlotTables | None = None
        self.requests = RequestTable()  # one row per sequence, in segment order
        self.device = None
        self.columns = 0  # token columns processed (padding included)
        self.num_evictions = 0
        self.evicted_entries = 0
        self.policy_scores: torch.Tensor | None = None  # per-slot scores a baseline policy keeps between calls
        self.plan: ForwardPlan | None = None  # the current (or last) forward's token layout
        self._slots: torch.Tensor | None = None  # [L, N, H] pool slots of this forward's new entries
        self._padded = False  # some column of this forward is padding
        self._counted: torch.Tensor | None = None  # [B, T] queries whose attention the policy reads (None: none)
        self.views: KVViews | None = KVViews(self.num_layers)  # CPU attention path; None when kernels read the pool
        self.views_limit: int | None = None  # most bytes the views may take (None: no limit)
        self.views_skipped = 0  # forwards that attended through the pool because the views would pass views_limit
        self._views_now = False  # this forward attends over the views
        self._views_outdated = False  # the last forward added rows the views do not hold
        self._new_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # multi-token forwards: this layer's K/V
        self._decode_mass: list[torch.Tensor] = []  # decode: the layers' view masses so far (`from_decode_views`)
        self._pending_modality = None
        self._staged: dict[int, torch.Tensor] = {}
        self._token_ids: torch.Tensor | None = None  # ids known to the generation helper
        self._token_mask: torch.Tensor | None = None

    def reset(self) -> None:
        self._reset_state()
        self.policy.reset()
        for layer in self.layers:
            layer.is_initialized = False

    @property
    def batch_size(self) -> int:
        return len(self.requests) if len(self.requests) else -1

    @property
    def segments_per_sequence(self) -> int:
        return self.num_layers * self.num_kv_heads

    @property
    def seen(self) -> list[int]:
        """Real tokens seen per sequence (a copy of the request table's column)."""
        return self.requests.column("seen")

    @property
    def peak_entries(self) -> list[int]:
        """Most entries each sequence has held at once (a copy of the request table's column)."""
        return self.requests.column("peak_entries")

    def _initialize(self, batch_size: int, device, dtype) -> None:
        if not len(self.requests):
            for _ in range(batch_size):
                self.requests.add()
        self.device = device
        self.pool = SlotPool(self.head_dim, dtype, device)
        self.tables = SlotTables(len(self.requests) * self.segments_per_sequence, device)
        if not uses_views(self.pool.k):
            self.views = None  # CUDA / Triton: the ragged kernels read the slot pool in place
        for layer in self.layers:
            layer.is_initialized = True

    # --- sequences ------------------------------------------------------------------------------
    def use_pool(self, pool: SlotPool) -> None:
        """Keep this cache's entries in `pool`, which other caches may share (a server's one bounded
        pool). Call before the first forward; the cache then starts with no sequences."""
        if self.pool is not None:
            raise RuntimeError("use_pool must be called before the cache's first forward")
        self._initialize(0, pool.device, pool.dtype)
        self.pool = pool

    def add_sequence(self, parked: ParkedSequence | None = None) -> int:
        """Add a sequence as the last batch row of a live cache; returns its row. Empty by default, or
        a `parked` one (from `park_sequence` on a cache with the same pool), whose entries come back
        without copying. The others' entries and bookkeeping are untouched; the next forward's input
        must have one more row."""
        self._check_between_forwards("add a sequence")
        row = self.requests.add(parked.state if parked is not None else None)
        if self.tables is not None:
            if parked is None:
                self.tables.add_segments(self.segments_per_sequence)
            else:
                self.tables.add_segments(self.segments_per_sequence, parked.slots, parked.lengths)
        if self._token_ids is not None:  # every column processed so far is padding for the new row
            self._token_ids = torch.cat([self._token_ids, self._token_ids.new_zeros(1, self._token_ids.shape[1])])
            self._token_mask = torch.cat([self._token_mask, self._token_mask.new_zeros(1, self._token_mask.shape[1])])
        return row

    def remove_sequence(self, row: int) -> None:
        """Retire batch row `row`: its slots go back to the pool's free list, the rows after it move up
        by one; the other sequences' entries and bookkeeping are untouched."""
        parked = self.park_sequence(row)
        if self.pool is not None:
            self.pool.release(parked.slots)

    def park_sequence(self, row: int) -> ParkedSequence:
        """Take batch row `row` out like `remove_sequence`, but keep its slots allocated: the returned
        sequence can be added back later (to this cache or another one on the same pool)."""
        self._check_between_forwards("remove a sequence")
        if not 0 <= row < len(self.requests):
            raise IndexError(f"row {row} out of range for a cache of {len(self.requests)} sequences")
        lh = self.segments_per_sequence
        if self.tables is not None:
            lengths = self.tables.seg_len[row * lh : (row + 1) * lh].to(torch.int64)
            slots = self.tables.remove_segments(row * lh, lh)
        else:
            lengths, slots = torch.zeros(lh, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
        state = self.requests.remove(row)
        if self._token_ids is not None:
            keep = [b for b in range(self._token_ids.shape[0]) if b != row]
            self._token_ids, self._token_mask = self._token_ids[keep], self._token_mask[keep]
        return ParkedSequence(state, slots, lengths)

    def _check_between_forwards(self, action: str) -> None:
        if self._staged:
            raise RuntimeError(f"cannot {action} in the middle of a forward")
        self.plan = None
        if self.views is not None:
            self.views.invalidate()

    # --- hooks --------------------------------------------------------------------------------
    def note_input_ids(self, input_ids: torch.Tensor, images: bool = True, videos: bool = True) -> None:
        """Remember the modality of the next forward's tokens (from the image / video token ids; `images` /
        `videos` False: this forward has no such pixels, so those ids are text, e.g. generated ones)."""
        modality = torch.zeros_like(input_ids, dtype=torch.int8)
        if images and self.image_token_id is not None:
            modality[input_ids == self.image_token_id] = Modality.IMAGE
        if videos and self.video_token_id is not None:
            modality[input_ids == self.video_token_id] = Modality.VIDEO
        self._pending_modality = modality

    def set_next_modality(self, modality: torch.Tensor) -> None:
        """`Modality` codes of the next forward's tokens, `[B, T]`."""
        self._pending_modality = modality.to(torch.int8)

    def stage(self, layer_idx: int, log_beta: torch.Tensor, padding: torch.Tensor | None,
              kv_dtype: torch.dtype) -> None:
        """Called by the attention pre-hook with the layer's gate output `[B, T, H]`."""
        if layer_idx == 0:
            self._begin_forward(log_beta, padding, kv_dtype)
        self._staged[layer_idx] = log_beta

    def _begin_forward(self, log_beta: torch.Tensor, padding: torch.Tensor | None, kv_dtype: torch.dtype) -> None:
        batch, length, _ = log_beta.shape
        if self.pool is None:
            if len(self.requests) not in (0, batch):
                raise ConfigError(f"this cache holds {len(self.requests)} sequences, but the input has {batch}")
            self._initialize(batch, log_beta.device, kv_dtype)
        elif batch != len(self.requests):
            raise ConfigError(f"this cache holds {len(self.requests)} sequences, but the input has {batch}")
        device = self.device
        valid = torch.ones(batch, length, dtype=torch.bool, device=device) if padding is None else padding.to(device)
        counts = valid.sum(1).tolist()
        modality = self._pending_modality
        self._pending_modality = None
        if modality is None or tuple(modality.shape) != (batch, length):
            modality = torch.zeros(batch, length, dtype=torch.int8, device=device)
        self._evict_before_append(counts)
        self.plan = ForwardPlan.build(valid, self.requests.seen_tensor(device), modality.to(device))
        lh = self.segments_per_sequence
        self.pool.ensure_free(sum(counts) * lh, self._pool_limit(counts))
        self.tables.reserve(self.plan.new_tokens.repeat_interleave(lh),
                            headroom=max(self.config.buffer_size, max(counts, default=0)))
        self.requests.record_forward(counts, lh)
        self.columns += length
        self._padded = any(n != length for n in counts)
        self._counted = self.policy.observed_queries(self.plan)
        self._decode_mass = []
        self._views_now = self.views is not None and self._prepare_views(decode=length == 1)
        self._place_new_entries()

    def _place_new_entries(self) -> None:
        """Once per forward, for every layer at once: take the new entries' slots, write their positions
        and modality, and append them to the slot tables; each layer's `update` then writes only K/V."""
        plan, layers, heads = self.plan, self.num_layers, self.num_kv_heads
        n_tok = plan.token_batch.numel()
        self._slots = None
        if not n_tok:
            return
        slots = self.pool.pop(layers * n_tok * heads).view(layers, n_tok, heads)
        shape = slots.shape
        self.pool.write_positions(slots.flatten(), plan.token_position[None, :, None].expand(shape).flatten(),
                                  plan.token_modality[None, :, None].expand(shape).flatten())
        layer = torch.arange(layers, device=self.device)[:, None, None]
        segments = (plan.token_batch[None, :, None] * layers + layer) * heads + torch.arange(heads, device=self.device)
        counts = plan.new_tokens.repeat_interleave(self.segments_per_sequence)
        self.tables.append(segments.flatten(), plan.token_rank[None, :, None].expand(shape).flatten(),
                           slots.flatten(), counts)
        self._slots = slots

    def _prepare_views(self, decode: bool) -> bool:
        """Rebuild the views from the slot tables (before this forward appends) if they miss entries; a
        decode step then reserves its new column in every layer's view. False (views dropped) when
        the rebuilt views would take more than `views_limit` bytes: this forward reads the pool."""
        views = self.views
        if views.stale or self._views_outdated or (decode and views.spare < 1):
            slots, valid = self.tables.padded_slots(self.tables.all_layer_segments(self.num_layers, self.num_kv_heads))
            if self.views_limit is not None and KVViews.planned_bytes(
                    *slots.shape[:3], KVViews.columns_for(slots.shape[3], self.config.buffer_size), self.head_dim,
                    self.pool.dtype) > self.views_limit:
                views.invalidate()
                self.views_skipped += 1
                return False
            views.rebuild(self.pool, slots, valid, headroom=self.config.buffer_size)
        self._views_outdated = not decode  # a multi-token forward's rows are not mirrored
        if decode and self.plan.token_batch.numel():
            views.plan_append(self.plan.token_batch)
        return True

    def new_slots(self, layer_idx: int | None) -> torch.Tensor | None:
        """Pool slots `[N, H]` of this forward's new entries in one layer (plan token order), `[L, N, H]`
        in every layer for `layer_idx` None; None: none."""
        if self._slots is None or layer_idx is None:
            return self._slots
        return self._slots[layer_idx]

    def views_bytes(self) -> int:
        """Bytes of the CPU attention views (0 where the kernels read the pool in place)."""
        return self.views.storage_bytes() if self.views is not None else 0

    def _bound(self, n: int) -> int | None:
        """Most entries a sequence may hold during a forward that adds n tokens."""
        if self.budget is None:
            return None
        return self.budget + self.segments_per_sequence * max(self.config.buffer_size, n)

    def _pool_limit(self, counts: list[int]) -> int | None:
        if self.budget is None:
            return None
        return sum(self._bound(n) for n in counts)

    def _evicts(self) -> bool:
        """Whether this cache ever evicts: it has a budget, or its policy drops entries by a rule of its
        own (threshold's tau, which applies without a budget too)."""
        return self.budget is not None or self.policy.periodic

    def _evict_before_append(self, counts: list[int]) -> None:
        if not self._evicts():
            return
        lh = self.segments_per_sequence
        due = [
            b for b, (row, n) in enumerate(zip(self.requests, counts))
            if row.entries > 0 and (
                (self.budget is not None and row.entries + n * lh > self._bound(n))
                or (self.policy.periodic and row.since_eviction >= max(self.config.buffer_size, 1))
            )
        ]
        if due:
            self.evict(due)

    @torch.no_grad()
    def evict(self, sequences: list[int] | None = None) -> int:
        """Shrink the given sequences (default: all) to their budget (and, for the threshold policy, drop
        every entry below tau) now; returns entries evicted."""
        if not self._evicts() or self.pool is None:
            return 0
        sequences = list(range(len(self.requests))) if sequences is None else list(sequences)
        evicted = self.policy.evict(self, sequences)
        self.pool.released(evicted)
        if self.views is not None:
            self.views.invalidate()
        # every row is re-read from the tables: a policy may also drop entries of sequences not listed
        self.requests.record_eviction(sequences, self.tables.lengths_per_sequence(self.segments_per_sequence))
        self.num_evictions += 1
        self.evicted_entries += evicted
        return evicted

    def next_mrope_positions(self, batch: int) -> list[int]:
        """The M-RoPE position the next token of each sequence gets (its text position + rope delta)."""
        if self.pool is None:
            return [0] * batch
        return [row.seen + row.rope_delta for row in self.requests]

    def record_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Remember every token id of the conversation so far (processed or still pending)."""
        self._token_ids, self._token_mask = ids, mask

    def known_tokens(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of the conversation so far; columns processed by plain `model(...)` calls are
        unknown and filled with id 0 (they only matter to id-based logits processors)."""
        ids = self._token_ids if self._token_ids is not None else torch.zeros(batch, 0, dtype=torch.long)
        mask = self._token_mask if self._token_mask is not None else torch.zeros(batch, 0, dtype=torch.long)
        ids, mask = ids.to(device), mask.to(device)
        if ids.shape[1] < self.columns:
            fill = self.columns - ids.shape[1]
            ids = torch.cat([torch.zeros(batch, fill, dtype=ids.dtype, device=device), ids], 1)
            mask = torch.cat([torch.ones(batch, fill, dtype=mask.dtype, device=device), mask], 1)
        return ids, mask

    # --- transformers Cache API ----------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append the real (non-padding) tokens' K/V of one layer to the pool; returns the inputs."""
        if self.plan is None or layer_idx not in self._staged:
            raise integration_error(
                "the attention called DBTrimKVCache.update without running the retention pre-hook first "
                "(attach gates with dbtrimkv.attach_retention_gates or load the model with dbtrimkv.load_model; "
                "if they are attached, the attention no longer hands its cache to the hook)"
            )
        plan = self.plan
        log_beta = self._staged.pop(layer_idx)
        if self._slots is not None:
            slots = self._slots[layer_idx].flatten()
            if self._padded:
                tok_b, tok_j = plan.token_batch, plan.token_column
                k_rows, v_rows, beta_rows = key_states[tok_b, :, tok_j], value_states[tok_b, :, tok_j], log_beta[tok_b, tok_j]
            else:  # every column is a real token: (row, column) order is a reshape
                batch, heads, length, dim = key_states.shape
                k_rows = key_states.transpose(1, 2).reshape(batch * length, heads, dim)
                v_rows = value_states.transpose(1, 2).reshape(batch * length, heads, dim)
                beta_rows = log_beta
            self.pool.write_rows(slots, k_rows.reshape(slots.numel(), -1), v_rows.reshape(slots.numel(), -1),
                                 beta_rows.reshape(-1))
            if self._views_now and key_states.shape[2] == 1:
                self.views.append(layer_idx, k_rows, v_rows)
        if self._views_now and key_states.shape[2] > 1:
            self._new_kv[layer_idx] = (key_states, value_states)
        return key_states, value_states

    def attend(self, layer_idx: int, query: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of this forward's queries `[B, Hq, T, D]` over the layer's cached entries.
        (`plan.query_positions` gives their logical positions, -1 for padding.) A policy that reads
        attention statistics gets them here (`attention_stats`)."""
        if self._views_now:
            return self._attend_views(layer_idx, query, scale)
        if self._counted is not None:
            self.policy.observe_attention(self, layer_idx, from_pool(self, layer_idx, query, self._counted, scale))
        t = self.tables
        return ragged_attention(query, self.plan.query_positions, self.pool.k, self.pool.v, self.pool.pos,
                                t.table, t.seg_start, t.seg_len, layer_idx, self.num_layers, scale)

    def _attend_views(self, layer_idx: int, query: torch.Tensor, scale: float) -> torch.Tensor:
        """CPU path: attention over the layer's contiguous view plus this forward's own K/V."""
        views, dtype = self.views, query.dtype
        q_valid = self.plan.query_positions >= 0 if self._padded else None
        used = views.longest(layer_idx)  # columns past every segment's length are spare: not attended
        k, v = views.k[layer_idx, :, :, :used].to(dtype), views.v[layer_idx, :, :, :used].to(dtype)
        bias = views.bias[layer_idx, ..., :used].to(dtype)
        if query.shape[2] == 1:  # decode: the new token is in the view already
            if self._counted is None:
                return attend_view(query, q_valid, k, v, bias, scale)
            out, mass = attend_view_with_mass(query, q_valid, k, v, bias, scale, self._counted)
            self._decode_mass.append(mass)
            if layer_idx == self.num_layers - 1:  # the policy reads every layer's statistics at once
                masses, self._decode_mass = self._decode_mass, []
                self.policy.observe_attention(self, None, from_decode_views(self, masses))
            return out
        k_new, v_new = self._new_kv.pop(layer_idx)
        pool_dtype = self.pool.dtype  # attend to exactly what the pool stores
        k_new, v_new = k_new.to(pool_dtype), v_new.to(pool_dtype)
        if self._counted is not None:
            mass = attention_mass(query, self._counted, views.k[layer_idx, :, :, :used], views.length[layer_idx], k_new,
                                  q_valid, scale)
            self.policy.observe_attention(self, layer_idx, from_views(self, layer_idx, *mass, q_valid))
        return attend_view_and_new(query, q_valid, k, v, bias, k_new.to(dtype), v_new.to(dtype), scale)

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

    # --- introspection -------------------------------------------------------------------------
    def num_entries(self, batch_index: int = 0) -> int:
        """Entries currently cached for a sequence, over all layers and KV heads."""
        return int(self.requests[batch_index].entries) if self.pool is not None else 0

    def storage_bytes(self) -> int:
        """Bytes of the allocated K/V pool."""
        return self.pool.storage_bytes() if self.pool is not None else 0

    def full_cache_entries(self, batch_index: int = 0) -> int:
        """Entries a full (never evicting) cache would hold for this sequence."""
        return self.requests[batch_index].seen * self.segments_per_sequence if self.pool is not None else 0

    def entry_bytes(self) -> int:
        """Bytes of K + V of one entry."""
        return 2 * self.head_dim * (self.pool.k.element_size() if self.pool is not None else 2)

    def _segment_ids(self, batch_index: int) -> range:
        if not 0 <= batch_index < max(len(self.requests), 1):
            raise IndexError(f"batch_index {batch_index} out of range for batch size {len(self.requests)}")
        first = batch_index * self.segments_per_sequence
        return range(first, first + self.segments_per_sequence)

    def retained_positions(self, batch_index: int = 0) -> list[list[torch.Tensor]]:
        """Per layer, per KV head: sorted positions still cached (LongTensor on CPU)."""
        out = [[torch.empty(0, dtype=torch.long) for _ in range(self.num_kv_heads)] for _ in range(self.num_layers)]
        if self.pool is None:
            return out
        for s in self._segment_ids(batch_index):
            layer, head = divmod(s % self.segments_per_sequence, self.num_kv_heads)
            out[layer][head] = self.pool.pos[self.tables.entries(s)].to(torch.long).cpu()
        return out

    def retained_slots(self, batch_index: int = 0) -> torch.Tensor:
        """Slot ids of every cached entry of a sequence."""
        if self.pool is None:
            return torch.empty(0, dtype=torch.long)
        return torch.cat([self.tables.entries(s) for s in self._segment_ids(batch_index)])

    def retained_by_modality(self, batch_index: int = 0) -> dict[str, int]:
        """Cached entries of a sequence by modality of their token: text / image / video."""
        if self.pool is None:
            return {name: 0 for name in MODALITY_NAMES}
        codes = self.pool.modality[self.retained_slots(batch_index)].to(torch.int64)
        counts = torch.bincount(codes, minlength=len(MODALITY_NAMES)).tolist()
        return {name: int(counts[i]) for i, name in enumerate(MODALITY_NAMES)}

    def retained_per_head(self, batch_index: int = 0) -> torch.Tensor:
        """Entries cached per (layer, KV head): `[L, H]`."""
        if self.pool is None:
            return torch.zeros(self.num_layers, self.num_kv_heads, dtype=torch.long)
        lens = self.tables.seg_len[list(self._segment_ids(batch_index))]
        return lens.to(torch.long).view(self.num_layers, self.num_kv_heads).cpu()

    def clone(self) -> "DBTrimKVCache":
        """An independent copy (e.g. to ask several questions about one compressed video)."""
        other = object.__new__(DBTrimKVCache)
        other.__dict__.update(self.__dict__)
        other.layers = [RetentionCacheLayer(other, i) for i in range(self.num_layers)]
        for layer, src in zip(other.layers, self.layers):
            layer.is_initialized = src.is_initialized
        if self.pool is not None:
            other.pool, other.tables = self.pool.clone(), self.tables.clone()
        other.requests = self.requests.clone()
        other.policy = self.policy.clone()
        if self.policy_scores is not None:
            other.policy_scores = self.policy_scores.clone()
        other._staged, other.plan, other._pending_modality = {}, None, None
        other._new_kv, other._slots, other._views_now, other._decode_mass = {}, None, False, []
        if self.views is not None:
            other.views = KVViews(self.num_layers)  # rebuilt from the cloned pool on its next forward
        return other
