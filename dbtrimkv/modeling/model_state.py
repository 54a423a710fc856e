"""`ModelState`: what dbtrimkv attaches to a transformers model, in one typed record.

Why: the library needs to remember, per model, which retention gates are attached (their spec),
where they came from (base model, checkpoint, trained or fresh), the eviction settings the
checkpoint was saved with, the hooks it installed (so they can be removed), the lock that
serialises generations, the training attention's mode, and what the hooks hand on (the gates'
last output per layer, for the training loss). One record, stored under one attribute of the top-level model, replaces
loose private attributes on the model and its modules: no other `_dbtrimkv_*` attribute exists
(the hooks are bound to the record; per-call data travels in the attention call's keyword
arguments, `attention.AttentionCall`).
"""

from __future__ import annotations

import copy
import threading
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # types only; config never imports this module (tests/test_import_graph.py)
    from ..settings.config import DBTrimKVConfig

STATE_ATTRIBUTE = "_dbtrimkv_state"


@dataclass(frozen=True)
class GateSpec:
    """What `gates.attach_retention_gates` built; saved with the gate weights. Defined here, in the
    record that holds it, so the record needs nothing from the modules that build on it."""

    gate_type: str = "rg10"
    intermediate_size: int = 512
    bias_init: float = 18.0
    tie_layers: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelState:
    gate_spec: GateSpec | None = None  # set by attach_retention_gates
    gates_trained: bool = False  # loaded from a checkpoint (False: freshly initialised)
    base_model: str | None = None  # name or path of the base model
    checkpoint: str | None = None  # directory the gates were loaded from
    default_eviction: "DBTrimKVConfig | None" = None  # the settings the checkpoint was saved with
    hook_handles: list[Any] = field(default_factory=list)  # torch RemovableHandles of the installed hooks
    lock: Any = field(default_factory=threading.RLock, repr=False)  # see generation.model_lock
    train_backend: str | None = None  # "plain" / "flex" while the training attention is on
    teacher: bool = False  # inside `training.teacher_attention`: the text attention ignores the gates
    # the gates' output `[B, T, H_kv]` per text layer of the last forward without a retention cache (training
    # and plain calls; the capacity loss reads it); a cached forward's log beta goes to the cache's pool only
    log_beta: dict[int, Any] = field(default_factory=dict, repr=False)
    columns_before: int | None = None  # the retention cache's columns when the running decoder forward began

    def __deepcopy__(self, memo) -> "ModelState":
        """`copy.deepcopy(model)`: everything copied but the lock (a lock cannot be copied; the copy is a
        model of its own, with a lock of its own)."""
        clone = copy.copy(self)
        memo[id(self)] = clone
        for f in fields(self):
            if f.name != "lock":
                setattr(clone, f.name, copy.deepcopy(getattr(self, f.name), memo))
        clone.lock = threading.RLock()
        return clone

    def remove_hooks(self) -> None:
        """Remove every hook dbtrimkv installed on the model."""
        for handle in self.hook_handles:
            handle.remove()
        self.hook_handles.clear()


def model_state(model) -> ModelState:
    """The model's record, created empty on first use."""
    state = getattr(model, STATE_ATTRIBUTE, None)
    if state is None:
        state = ModelState()
        setattr(model, STATE_ATTRIBUTE, state)
    return state


def existing_state(model) -> ModelState | None:
    """The model's record, or None if dbtrimkv never touched the model."""
    return getattr(model, STATE_ATTRIBUTE, None)


def saved_eviction(model) -> "DBTrimKVConfig | None":
    """The eviction settings the model's checkpoint was saved with, if any."""
    state = existing_state(model)
    return state.default_eviction if state is not None else None
