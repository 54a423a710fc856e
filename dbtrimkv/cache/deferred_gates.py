"""`DeferredGates`: the `log beta` of decode tokens, computed for many tokens in one call per layer.

Why: a retention gate is three small linears per layer. Decoding one token, each call reads all of
the gate's weights for a single row: on the bench model (`bench/bench_engine.py`, 8 layers, hidden
1024) that made a decode step 8-13% slower than the plain model, while the cache's own work cost
0-3%. Yet a stored entry's `log beta` is read only when an eviction scores the entries (or someone
reads the pool). So a single-token forward queues each layer's gate input (the attention input of its
new real tokens) with the pool slots those tokens went to, and the queue is run through the gates,
calibrated (`calibration.py`) and written into the pool in one call per layer when it is needed:
before an eviction plans, before a sequence leaves the cache (park, remove) or the cache is cloned,
when the pool is read from outside (`DBTrimKVCache.pool`), and once the queued inputs pass
`MAX_BYTES` (checked before each forward), which bounds the memory the queue takes.

Same values: a gate is a function of its token's own hidden state; computing 32 rows at once instead of
one at a time changes only the matmul's rounding (float32 on CPU: ~1e-7 relative; bf16 GEMMs on CUDA
may pick another kernel for another row count, and under `torch.autocast` a queue completed outside
the forward runs in the gates' own dtype). Multi-token forwards (prefill chunks) are batched already
and compute their gates at once, as before. The calibration settings are read from the cache's
config when the values are computed.

Costs: the queue is per cache, up to `MAX_BYTES` plus one forward's rows, outside a server's
`--kv-memory` (there a decode step of 16 rows of an 8B model queues ~4.7 MiB, so the bound runs
it about every other step; a served row that is parked, e.g. between the phases of a mixed step or
when its request ends, completes its cache's whole queue). The batched gate call runs wherever the
queue is completed: in a server, also when a row is parked, outside the forward whose failure the
stepper isolates to its batch (a failure there, e.g. out of memory, fails the engine's requests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .calibration import calibrate, calibrate_forward
from .forward_plan import ForwardContext

MAX_BYTES = 8 << 20  # queued gate inputs past this are computed before the next forward


Gate = Callable[[torch.Tensor], torch.Tensor]  # attention input [..., d] -> log beta [..., H]


class DeferredGates:
    """A cache's gate runs: at once for a multi-token forward, queued for a single-token one. The queue
    holds, per layer, the gate and `(hidden rows [N, d], slots [N, H], modality [N])`."""

    def __init__(self, settings=None):
        self.settings = settings  # a `DBTrimKVConfig` (`video_decay_scale`, `decay_floor`); None: no calibration
        self._gates: dict[int, Gate] = {}
        self._queued: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self.bytes = 0  # of the queued hidden rows

    def __len__(self) -> int:
        """Queued (layer, forward) entries."""
        return sum(len(items) for items in self._queued.values())

    @property
    def full(self) -> bool:
        return self.bytes >= MAX_BYTES

    def stage(self, forward: ForwardContext, layer_idx: int, gate: Gate, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """One layer of `forward` with attention input `[B, T, d]`: put the calibrated log beta its `update`
        stores in `forward.staged[layer_idx]` and return the gate's output, or (a single-token forward)
        queue the real tokens' rows and stage / return None."""
        plan = forward.plan
        if hidden_states.shape[1] == 1 and forward.slots is not None:
            rows = hidden_states[plan.token_batch, plan.token_column] if forward.padded else hidden_states[:, 0]
            self.add(layer_idx, gate, rows, forward.slots[layer_idx], plan.token_modality)
            forward.staged[layer_idx] = None
            return None
        log_beta = gate(hidden_states)  # [B, T, H]
        forward.staged[layer_idx] = calibrate_forward(log_beta, plan, *self._calibration())
        return log_beta

    def add(self, layer_idx: int, gate: Gate, hidden: torch.Tensor, slots: torch.Tensor, modality: torch.Tensor) -> None:
        """Queue one layer's new real tokens: their gate input `[N, d]`, slots `[N, H]`, codes `[N]`."""
        self._gates[layer_idx] = gate
        self._queued.setdefault(layer_idx, []).append((hidden, slots, modality))
        self.bytes += hidden.numel() * hidden.element_size()

    def write_into(self, log_beta: torch.Tensor) -> None:
        """Compute every queued entry's calibrated `log beta` into `log_beta` (the pool's, by slot) and
        empty the queue."""
        if not self._queued:
            return
        with torch.inference_mode():  # (the pool may hold inference tensors; nothing here needs a graph)
            for layer_idx, items in self._queued.items():
                hidden, slots, modality = (torch.cat(parts) for parts in zip(*items))
                values = calibrate(self._gates[layer_idx](hidden)[None], modality[None], *self._calibration())
                log_beta.index_copy_(0, slots.flatten(), values[0].reshape(-1).to(torch.float32))
        self.clear()

    def _calibration(self) -> tuple[float, float]:
        settings = self.settings
        return (1.0, 0.0) if settings is None else (settings.video_decay_scale, settings.decay_floor)

    def clear(self) -> None:
        self._queued.clear()
        self._gates.clear()
        self.bytes = 0
