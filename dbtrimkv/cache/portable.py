"""Compressed caches that travel: a `DBTrimKVCache` (or one parked sequence) saved to one file.

Why: a bounded cache is small and everything a next forward needs is in it, so it can be stored
and reused: encode an hour of video once and ask about it later, or move a conversation to
another process or machine (the server's session store). This module owns the file format.

Format (one file, conventionally `*.dbkv`): a safetensors file, never a pickle. Its header
metadata holds one JSON document under the key `dbtrimkv` (format name, `FORMAT_VERSION`, the
model identity, the eviction settings, one bookkeeping row per sequence (the ids it feeds first, its
pending token, included; a file written before rows held them gets them from its known tokens or
its session's last reply ids), tokens processed, the
pool's capacity, eviction counters and a caller's `extra` mapping). Its tensors hold only the
kept entries (compact), in segment order (row, layer, KV head, then position order):
`k`, `v` `[N, D]` in the cache's dtype, `log_beta` `[N]`, `pos` `[N]`, `modality` `[N]`;
`seg_len` `[B*L*H]`; `slot_ids` `[N]` and `free_slots` (the pool's free stack) so that a cache
loaded on its own gets every entry back in the slot it had (the random policy scores by slot);
`policy_scores` `[N]` (SnapKV / H2O statistics); `token_ids` / `token_mask` (the conversation's
known tokens, the last sampled one included); `policy.<name>` (a policy's own state).

Loading checks, before anything is built, the format and version, then the model: layers, KV
heads, head size, dtype, and a fingerprint of the model's configuration, gates and first
attention layer's weights (what produces the cached K/V); a mismatch raises `CacheMismatchError`
naming it. A loaded cache gives the same next tokens as the one that was saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..settings.config import DBTrimKVConfig
from ..errors import CacheFileError, CacheMismatchError, ConfigError
from ..modeling.model_anatomy import text_attention_modules, text_config_of
from ..modeling.model_state import existing_state
from .cache import DBTrimKVCache
from .pool import SlotPool
from .requests import ParkedSequence, SequenceState

FORMAT_NAME = "dbtrimkv-cache"
FORMAT_VERSION = 1
METADATA_KEY = "dbtrimkv"
_COUNT_FIELDS = tuple(f.name for f in fields(SequenceState) if f.name != "pending")


@dataclass(frozen=True)
class ModelIdentity:
    """What a saved cache must match in the model it is loaded into."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    fingerprint: str

    @classmethod
    def of(cls, model) -> "ModelIdentity":
        text = text_config_of(model)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        param = next(model.parameters())
        return cls(text.num_hidden_layers, text.num_key_value_heads, head_dim, str(param.dtype).removeprefix("torch."),
                   _fingerprint(model, text))

    def check(self, saved: dict, path) -> None:
        """Raise `CacheMismatchError` naming the first difference between `saved` and this model."""
        if not isinstance(saved, dict):
            raise CacheFileError(f"{path}: the metadata has no model section")
        for name, what in (("num_layers", "layers"), ("num_kv_heads", "KV heads"), ("head_dim", "head size"),
                           ("dtype", "dtype")):
            if saved.get(name) != getattr(self, name):
                raise CacheMismatchError(f"{path} was saved from a model with {what} {saved.get(name)!r}, but this model "
                                         f"has {getattr(self, name)!r}: load it into the model it was saved from")
        if saved.get("fingerprint") != self.fingerprint:
            raise CacheMismatchError(f"{path} was saved from another model (same shapes, different configuration or "
                                     "weights): load it into the model it was saved from")


def _fingerprint(model, text) -> str:
    """sha256 of the text config, the gate spec and every parameter of the first attention layer."""
    digest = hashlib.sha256()
    config = {k: v for k, v in sorted(text.to_dict().items()) if not k.startswith("_") and k != "transformers_version"}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    state = existing_state(model)
    spec = state.gate_spec.to_dict() if state is not None and state.gate_spec is not None else None
    digest.update(json.dumps(spec, sort_keys=True).encode())
    for name, param in sorted(text_attention_modules(model)[0].named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


# --- saving ------------------------------------------------------------------------------------
def save_cache(model, cache, path: str | Path, extra: dict | None = None) -> int:
    """Write `cache` (every sequence it holds; made for `model`) to `path`; returns the file's size in
    bytes. `extra`: a JSON-able mapping stored beside it (returned by `load_cache`)."""
    if not isinstance(cache, DBTrimKVCache):
        raise ConfigError(f"save_cache needs a DBTrimKVCache, got {type(cache).__name__}")
    path = _file_path(path)
    identity = ModelIdentity.of(_module(model))
    if (cache.num_layers, cache.num_kv_heads, cache.head_dim) != (identity.num_layers, identity.num_kv_heads,
                                                                   identity.head_dim):
        raise CacheMismatchError("this cache was not made for this model (layers, KV heads or head size differ)")
    meta = _base_meta(identity, cache.config, extra)
    meta.update(columns=int(cache.columns), num_evictions=int(cache.num_evictions),
                evicted_entries=int(cache.evicted_entries), views_limit=cache.views_limit)
    tensors: dict[str, torch.Tensor] = {f"policy.{k}": v for k, v in cache.policy.state_tensors().items()}
    if cache.pool is not None:
        t = cache.tables
        _, index = t.enumerate_entries()
        slots = t.table[index].to(torch.int64)
        tensors.update(_entries(cache.pool, slots, t.seg_len, cache.policy_scores))
        tensors["free_slots"] = cache.pool.free_slots[: cache.pool.num_free].cpu()
        ids, mask = cache.known_tokens(len(cache.requests), "cpu")
        tensors.update(token_ids=ids.to(torch.int32), token_mask=mask.to(torch.int8))
        meta.update(rows=[asdict(row) for row in cache.requests], pool_capacity=int(cache.pool.capacity))
    return _write(path, meta, tensors)


def save_parked(path: str | Path, identity: ModelIdentity, config: DBTrimKVConfig, pool: SlotPool,
                parked: ParkedSequence, policy_scores: torch.Tensor | None = None, extra: dict | None = None) -> int:
    """Write one sequence parked in a (shared) pool, e.g. a server's session; returns bytes written."""
    meta = _base_meta(identity, config, extra)
    meta.update(rows=[asdict(parked.state)])
    tensors = _entries(pool, parked.slots.to(torch.int64), parked.lengths, policy_scores)
    return _write(path, meta, tensors)


def _file_path(path) -> Path:
    """`path` as a Path, or `CacheFileError` for what cannot name a cache file (None, a number, a folder)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise CacheFileError(f"a cache file path must be a non-empty string or a Path, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise CacheFileError(f"{path} is a folder; give a file path, such as {path / 'cache.safetensors'}")
    return path


def _module(model):
    """`model`, which must be the torch model a cache belongs to (ConfigError otherwise)."""
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"a saved cache belongs to a model: pass the model, got {type(model).__name__}")
    return model


def _base_meta(identity: ModelIdentity, config: DBTrimKVConfig, extra: dict | None) -> dict:
    if extra is not None and not isinstance(extra, dict):
        raise ConfigError(f"extra must be a JSON-able dict, got {type(extra).__name__}")
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"extra must be a JSON-able dict: {exc}") from None
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model": asdict(identity), "settings": config.to_dict(),
            "rows": [], "extra": extra or {}}


def _entries(pool: SlotPool, slots: torch.Tensor, seg_len: torch.Tensor, scores: torch.Tensor | None) -> dict:
    """The kept entries at `slots` (segment order) and their segments' lengths, on the host."""
    out = {"k": pool.k[slots], "v": pool.v[slots], "log_beta": pool.log_beta[slots], "pos": pool.pos[slots],
           "modality": pool.modality[slots], "seg_len": seg_len.to(torch.int64), "slot_ids": slots.to(torch.int32)}
    if scores is not None:
        padded = torch.cat([scores, scores.new_zeros(max(pool.capacity - scores.numel(), 0))])
        out["policy_scores"] = padded[slots]
    return {name: tensor.detach().cpu().contiguous() for name, tensor in out.items()}


def _write(path: str | Path, meta: dict, tensors: dict[str, torch.Tensor]) -> int:
    """Write atomically (a temporary file in the same folder, then a rename); missing folders are created."""
    path = _file_path(path)
    header = {METADATA_KEY: json.dumps(meta, sort_keys=True)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise CacheFileError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(handle)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=header)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):  # a full disk, a folder taken away meanwhile
            raise CacheFileError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
    return path.stat().st_size


# --- loading -----------------------------------------------------------------------------------
@dataclass
class SavedCache:
    """A cache file read and checked against a model; tensors on the host until placed."""

    path: str
    meta: dict
    tensors: dict[str, torch.Tensor]

    @property
    def extra(self) -> dict:
        return self.meta.get("extra", {})

    @property
    def num_entries(self) -> int:
        return int(self.tensors["k"].shape[0]) if "k" in self.tensors else 0

    @property
    def config(self) -> DBTrimKVConfig:
        try:
            return DBTrimKVConfig.from_dict(self.meta["settings"])
        except (ConfigError, TypeError) as exc:
            raise CacheFileError(f"{self.path}: bad eviction settings ({exc})") from None

    def rows(self) -> list[SequenceState]:
        try:
            return [SequenceState(**{k: int(row[k]) for k in _COUNT_FIELDS},
                                  pending=tuple(int(i) for i in row.get("pending", self._older_pending(b))))
                    for b, row in enumerate(self.meta["rows"])]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CacheFileError(f"{self.path}: bad sequence rows ({exc!r})") from None

    def _older_pending(self, row: int) -> list[int]:
        """Pending ids of a file written before rows kept them: a cache's known tokens past the columns
        it processed; a server session's reply's last id (`extra["last_ids"]`)."""
        if "token_ids" in self.tensors and "columns" in self.meta:
            columns = int(self.meta["columns"])
            ids, mask = self.tensors["token_ids"][row, columns:], self.tensors["token_mask"][row, columns:]
            return ids[mask.bool()].tolist()
        return [int(i) for i in self.extra.get("last_ids", [])][-1:]

    def to_cache(self, model):
        """A new `DBTrimKVCache` on the model's device holding exactly the saved state."""
        cache = DBTrimKVCache(model, self.config)
        policy_state = {k.removeprefix("policy."): v for k, v in self.tensors.items() if k.startswith("policy.")}
        try:
            cache.policy.load_state_tensors(policy_state)
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CacheFileError(f"{self.path}: bad policy state ({exc})") from None
        cache.set_views_limit(self.meta.get("views_limit"))
        if "pool_capacity" not in self.meta:
            return cache  # saved before its first forward
        device = next(model.parameters()).device
        rows, lh = self.rows(), cache.segments_per_sequence
        capacity = int(self.meta["pool_capacity"])
        slots = self.tensors["slot_ids"].to(torch.int64)
        free = self.tensors["free_slots"].to(torch.int32)
        used = torch.zeros(capacity + 1, dtype=torch.int64)
        every = torch.cat([slots, free.to(torch.int64)])
        used.index_add_(0, every.clamp(0, capacity), torch.ones_like(every))
        if slots.numel() + free.numel() != capacity or bool((used[:capacity] != 1).any()):
            raise CacheFileError(f"{self.path}: the slot ids and free slots do not partition the pool (corrupt file)")
        pool = SlotPool(cache.head_dim, _dtype(self.meta["model"]["dtype"]), device)
        pool.ensure_free(capacity, limit=capacity)
        self._write_entries(pool, slots.to(device))
        pool.free_slots[: free.numel()] = free.to(device)
        pool.num_free = free.numel()
        pool.free_top.fill_(pool.num_free)
        cache.use_pool(pool)
        seg_len = self.tensors["seg_len"]
        offset = 0
        for b, state in enumerate(rows):
            lengths = seg_len[b * lh: (b + 1) * lh]
            count = int(lengths.sum())
            cache.add_sequence(ParkedSequence(state, slots[offset: offset + count].to(device), lengths))
            offset += count
        cache.restore_counters(int(self.meta["columns"]), int(self.meta["num_evictions"]),
                               int(self.meta["evicted_entries"]))
        if "policy_scores" in self.tensors:
            cache.policy.place_scores(slots.to(device), self.tensors["policy_scores"], capacity)
        cache.record_tokens(self.tensors["token_ids"].to(device, torch.int64),
                            self.tensors["token_mask"].to(device, torch.int64))
        return cache

    def to_parked(self, pool: SlotPool) -> tuple[ParkedSequence, torch.Tensor | None]:
        """The one saved sequence placed in fresh slots of `pool` (which must have them free), and its
        policy scores by those slots (None if none were saved)."""
        rows = self.rows()
        if len(rows) != 1:
            raise CacheFileError(f"{self.path} holds {len(rows)} sequences, not one")
        slots = pool.pop(self.num_entries)
        self._write_entries(pool, slots)
        scores = self.tensors.get("policy_scores")
        lengths = self.tensors["seg_len"]
        return ParkedSequence(rows[0], slots, lengths), (scores.to(pool.device) if scores is not None else None)

    def _write_entries(self, pool: SlotPool, slots: torch.Tensor) -> None:
        t, device = self.tensors, pool.device
        pool.write_rows(slots, t["k"].to(device), t["v"].to(device), t["log_beta"].to(device))
        pool.write_positions(slots, t["pos"].to(device), t["modality"].to(device))


def read_saved(path: str | Path, identity: ModelIdentity) -> SavedCache:
    """Read `path` and check it against `identity` (format, version, model); `CacheFileError` /
    `CacheMismatchError` name what is wrong."""
    meta = read_metadata(path)
    identity.check(meta.get("model"), path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CacheFileError(f"{path}: cannot read the saved tensors ({exc})") from None
    saved = SavedCache(str(path), meta, tensors)
    _check_tensors(saved, identity)
    return saved


def read_metadata(path: str | Path) -> dict:
    """The JSON metadata of a cache file (no tensors read), after the format and version checks."""
    path = _file_path(path)
    if not path.is_file():
        raise CacheFileError(f"cache file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CacheFileError(f"{path} is not a dbtrimkv cache file (not safetensors: {exc})") from None
    try:
        meta = json.loads(header[METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        raise CacheFileError(f"{path} is a safetensors file but not a dbtrimkv cache (no '{METADATA_KEY}' metadata)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CacheFileError(f"{path} is not a dbtrimkv cache file")
    if meta.get("version") != FORMAT_VERSION:
        raise CacheFileError(f"{path} has cache format version {meta.get('version')!r}; this dbtrimkv reads version "
                             f"{FORMAT_VERSION}: save the cache again with this version")
    return meta


def _check_tensors(saved: SavedCache, identity: ModelIdentity) -> None:
    """Shapes and dtypes that must agree with each other and the model (a corrupt file fails here)."""
    t, n = saved.tensors, saved.num_entries
    if "k" not in t:
        if saved.meta.get("rows"):
            raise CacheFileError(f"{saved.path}: sequences without entries tensors (corrupt file)")
        return
    dtype = _dtype(identity.dtype)
    expected = {"k": ((n, identity.head_dim), dtype), "v": ((n, identity.head_dim), dtype),
                "log_beta": ((n,), torch.float32), "pos": ((n,), torch.int32), "modality": ((n,), torch.int8),
                "slot_ids": ((n,), torch.int32), "seg_len": (None, torch.int64)}
    if "policy_scores" in t:
        expected["policy_scores"] = ((n,), torch.float32)
    for name, (shape, want) in expected.items():
        tensor = t.get(name)
        if tensor is None or tensor.dtype != want or (shape is not None and tuple(tensor.shape) != shape):
            raise CacheFileError(f"{saved.path}: tensor {name!r} is missing or has the wrong shape or dtype (corrupt file)")
    rows = len(saved.meta.get("rows") or [])
    if t["seg_len"].numel() != rows * identity.num_layers * identity.num_kv_heads:
        raise CacheFileError(f"{saved.path}: {t['seg_len'].numel()} segments for {rows} sequences (corrupt file)")
    if int(t["seg_len"].sum()) != n or bool((t["seg_len"] < 0).any()):
        raise CacheFileError(f"{saved.path}: segment lengths do not add up to the {n} saved entries (corrupt file)")


def _dtype(name) -> torch.dtype | None:
    value = getattr(torch, name, None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) else None


def load_cache(model, path: str | Path):
    """`(cache, extra)`: the `DBTrimKVCache` saved at `path`, rebuilt for `model`, and its `extra`."""
    saved = read_saved(path, ModelIdentity.of(_module(model)))
    return saved.to_cache(model), saved.extra
