"""Admission control from the memory bound: size the pool once, admit only what is sure to fit.

Why: a sequence in a `DBTrimKVCache` never holds more than `budget + L*H*max(buffer_size, n)`
entries, n the tokens of one forward (the prefill chunk, or 1 when decoding). So a request's peak
KV is known before it starts, and a server can reserve exactly that much of one pool sized at
start-up: a request runs only when its bound fits beside the bounds of the running ones (and the
slots of parked sessions), otherwise it waits. Memory never grows past the pool, whatever the load.
"""

from __future__ import annotations

import re

import torch

from ..errors import ConfigError

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


def pool_slots(kv_memory: tuple[str, float], head_dim: int, dtype: torch.dtype, device: torch.device) -> int:
    kind, value = kv_memory
    size = value * available_memory(device) if kind == "fraction" else value
    return int(size // slot_bytes(head_dim, dtype))


def request_bound(budget: int, segments: int, buffer_size: int, chunk: int, new_tokens: int) -> int:
    """Most pool slots a request may hold: its budget plus one forward's worth of entries above it.

    The largest forward adds `min(chunk, new_tokens)` tokens (a prefill chunk) or 1 (decoding)."""
    return budget + segments * max(buffer_size, min(chunk, max(new_tokens, 1)), 1)


class Admission:
    """Slots reserved in the pool: running requests reserve their bound, parked sessions what they hold."""

    def __init__(self, pool_slots: int):
        self.pool_slots = pool_slots
        self.running: dict[str, int] = {}
        self.parked: dict[str, int] = {}

    @property
    def reserved(self) -> int:
        return sum(self.running.values()) + sum(self.parked.values())

    def fits(self, bound: int, releasing: int = 0) -> bool:
        """Would a request with this bound fit, if `releasing` parked slots it takes over were freed?"""
        return self.reserved - releasing + bound <= self.pool_slots

    def admit(self, request_id: str, bound: int) -> None:
        self.running[request_id] = bound

    def release(self, request_id: str) -> None:
        self.running.pop(request_id, None)

    def park(self, session_id: str, slots: int) -> None:
        self.parked[session_id] = slots

    def unpark(self, session_id: str) -> None:
        self.parked.pop(session_id, None)
