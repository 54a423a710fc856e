"""Admission control from the memory bound: size the pool (and the views) once, admit only what fits.

Why: a sequence in a `DBTrimKVCache` never holds more than `budget + L*H*max(buffer_size, n)`
entries, n the tokens of one forward (the prefill chunk, or 1 when decoding). So a request's peak
KV is known before it starts, and a server can reserve exactly that much of one pool sized at
start-up: a request runs only when its bound fits beside the bounds of the running ones (and the
slots of parked sessions), otherwise it waits.

On CPU the caches also keep `KVViews`, contiguous per-layer copies of the running rows' kept
entries, padded to the longest segment of their batch. `--kv-memory` pays for both: `split_memory`
gives the pool the share a default request's bound takes, the views the rest. Each request also
reserves view bytes for `view_columns` columns per segment (its bound spread evenly over its
segments, or every token it can see when that is fewer, plus the views' decode headroom), and a
batch's views are reserved as its rows x its widest reservation (the padding is real). The engine
caps every batch's views at what its rows reserved (`DBTrimKVCache.views_limit`: beyond it a
forward attends through the pool, keeping no copy), so pool bytes + view bytes never exceed
`--kv-memory`, whatever the load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..cache.views import KVViews
from ..settings.config import DBTrimKVConfig
from ..errors import ConfigError
from . import refusals

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "tb": 1000**4}


def parse_kv_memory(text: str) -> tuple[str, float]:
    """`("bytes", n)` for sizes like `4GiB`, `512MB`, `1000000`; `("fraction", f)` for `0 < f <= 1`."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"--kv-memory must be a size such as 4GiB or 512MiB, or a fraction of device memory "
                          f"such as 0.5, got {text!r}")
    digits = match.group(1)
    value = float(digits)
    if not unit and ("." in digits or value <= 1):  # a bare 0.5 or 1: a fraction
        if not 0 < value <= 1:
            raise ConfigError(f"--kv-memory as a fraction of device memory must be in (0, 1], got {text!r}")
        return "fraction", value
    if value * _UNITS[unit] < 1:
        raise ConfigError(f"--kv-memory must be positive, got {text!r}")
    return "bytes", value * _UNITS[unit]


def slot_bytes(head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one pool slot: K and V vectors, log beta (fp32), position (int32), modality, free-list id."""
    return 2 * head_dim * torch.empty(0, dtype=dtype).element_size() + 4 + 4 + 1 + 4


def available_memory(device: torch.device) -> int:
    """Free memory of the device (CUDA: free device memory; CPU: available system memory)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def memory_bytes(kv_memory: tuple[str, float], device: torch.device) -> int:
    """Bytes `--kv-memory` stands for (a fraction is of the device's free memory now)."""
    kind, value = kv_memory
    return int(value * available_memory(device) if kind == "fraction" else value)


def split_memory(total: int, per_slot: int, bound: int, view_bytes: int) -> tuple[int, int]:
    """(pool slots, view bytes) out of `total` bytes, in the proportion of one request that reserves
    `bound` slots and `view_bytes` of views (0 where the kernels read the pool: all of it is pool)."""
    slots = int(total * bound // (bound * per_slot + view_bytes))
    return slots, total - slots * per_slot


def server_budget(config: DBTrimKVConfig, num_layers: int, num_kv_heads: int) -> int:
    """The server's budget (entries per request under its settings), resolved once at start-up; a
    `ConfigError` when the settings keep everything (admission needs each request's bound)."""
    budget = config.resolve_budget(num_layers, num_kv_heads)
    if budget is None:
        raise ConfigError(refusals.no_budget())
    return budget


def request_bound(budget: int, segments: int, buffer_size: int, chunk: int, new_tokens: int) -> int:
    """Most pool slots a request may hold: its budget plus one forward's worth of entries above it.

    The largest forward adds `min(chunk, new_tokens)` tokens (a prefill chunk) or 1 (decoding)."""
    return budget + segments * max(buffer_size, min(chunk, max(new_tokens, 1)), 1)


def view_columns(bound: int, segments: int, seen_max: int, buffer_size: int) -> int:
    """View columns per segment reserved for a request: its bound spread evenly over its segments,
    or every token it can see if that is fewer (a segment holds one entry per token), plus headroom."""
    return KVViews.columns_for(min(seen_max, -(-bound // segments)), buffer_size)


@dataclass(frozen=True)
class Reservation:
    """What a running request reserves: pool slots (its bound) and view columns in its batch `group`."""

    slots: int
    group: tuple = ()
    view_columns: int = 0


class Admission:
    """Memory reserved: running requests reserve their bound in the pool and their views (rows x the
    batch's widest reservation, per batch); parked sessions the slots they hold (they have no views).
    `row_view_bytes(columns)` gives one row's view bytes; None where the caches keep no views."""

    def __init__(self, pool_slots: int, view_bytes: int = 0, row_view_bytes: Callable[[int], int] | None = None):
        self.pool_slots, self.view_bytes, self.row_view_bytes = pool_slots, view_bytes, row_view_bytes
        self.running: dict[str, Reservation] = {}
        self.parked: dict[str, int] = {}

    # (the /metrics handler reads these from another thread: iterate over snapshots, `list(...)`)
    @property
    def reserved(self) -> int:
        """Pool slots reserved."""
        return sum(r.slots for r in list(self.running.values())) + sum(list(self.parked.values()))

    def group_view_bytes(self, group: tuple, extra: Reservation | None = None) -> int:
        """View bytes reserved for one batch (with `extra` admitted to it)."""
        members = [r for r in list(self.running.values()) if r.group == group] + ([extra] if extra is not None else [])
        if self.row_view_bytes is None or not members:
            return 0
        return len(members) * self.row_view_bytes(max(r.view_columns for r in members))

    def views_reserved(self, extra: Reservation | None = None) -> int:
        """View bytes reserved over all batches (with `extra` admitted)."""
        groups = {r.group for r in list(self.running.values())} | ({extra.group} if extra is not None else set())
        return sum(self.group_view_bytes(g, extra if extra is not None and extra.group == g else None) for g in groups)

    def alone_fits(self, reservation: Reservation) -> bool:
        """Could the request ever run (in an empty server)?"""
        views = 0 if self.row_view_bytes is None else self.row_view_bytes(reservation.view_columns)
        return reservation.slots <= self.pool_slots and views <= self.view_bytes

    def never_fits(self, reservation: Reservation) -> str | None:
        """Why a request could never run, even in an empty server (None if it could): its refusal at
        start-up (the smallest request) and per request."""
        if self.alone_fits(reservation):
            return None
        views = 0 if self.row_view_bytes is None else self.row_view_bytes(reservation.view_columns)
        return refusals.over_pool(reservation.slots, views, self.pool_slots, self.view_bytes)

    def views_fit(self, reservation: Reservation) -> bool:
        return self.views_reserved(reservation) <= self.view_bytes

    def slots_fit(self, reservation: Reservation, releasing: int = 0) -> bool:
        """Do its slots fit, if `releasing` parked slots it takes over were freed?"""
        return self.reserved - releasing + reservation.slots <= self.pool_slots

    def admit(self, request_id: str, reservation: Reservation) -> None:
        self.running[request_id] = reservation

    def release(self, request_id: str) -> None:
        self.running.pop(request_id, None)

    def park(self, session_id: str, slots: int) -> None:
        self.parked[session_id] = slots

    def unpark(self, session_id: str) -> None:
        self.parked.pop(session_id, None)
