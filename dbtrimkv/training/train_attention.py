"""The `dbtrimkv_train` attention implementation: student (biased) and teacher (plain) in one model.

Why: distillation needs the teacher's logits (full attention) and the student's (retention-biased)
from the same frozen weights. Keeping one copy of the model and flipping a flag is free, whereas a
second copy of a 4B/8B model is not. The gate pre-hook installed by `attach_retention_gates`
already computes every layer's `log beta` on each forward and hands it to the attention function
(`attention.AttentionCall`, with the model's `ModelState`, which records the backend and the
teacher flag); the function registered here reads both.

- Student (default): `biased_attention` (plain torch, CPU / short sequences) or
  `biased_flex_attention` (FlexAttention, CUDA), chosen per model by `enable_training_attention`.
- Teacher (inside `teacher_attention(model)`): ordinary SDPA with the mask the `sdpa`
  implementation would have built, i.e. exactly the model's normal attention.

The mask entry returns a lazy object: each layer asks it for the form it needs (a boolean mask for
the plain path, a `BlockMask` for flex, the SDPA mask for the teacher) and it is built once per
forward. Padding and packed sequences come from transformers' own mask functions. The vision
tower keeps `sdpa`.
"""

from __future__ import annotations

from contextlib import contextmanager

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask, sdpa_mask

from ..modeling.attention import ATTENTION_CALL_KEY, LazyCausalMask
from ..errors import ConfigError
from ..modeling.model_anatomy import RETENTION_ATTENTION, set_text_attention, text_attention_modules
from ..modeling.model_state import model_state
from .biased_attention import biased_attention, biased_flex_attention

TRAIN_ATTENTION_NAME = "dbtrimkv_train"
BACKENDS = ("auto", "plain", "flex")


class TrainingMask(LazyCausalMask):
    """Mask arguments from `create_causal_mask`, turned into each backend's mask on first use."""

    def __init__(self, mask_kwargs: dict):
        super().__init__(mask_kwargs)
        self._boolean = None
        self._block = None

    def boolean(self):
        """`[B, 1, Tq, Tk]` bool (True = attend), always materialised (padding, packing included)."""
        if self._boolean is None:
            self._boolean = sdpa_mask(**{**self.mask_kwargs, "allow_is_causal_skip": False})
        return self._boolean

    def block_mask(self):
        if self._block is None:
            self._block = flex_attention_mask(**self.mask_kwargs)
        return self._block


def training_mask(**mask_kwargs) -> TrainingMask:
    return TrainingMask(mask_kwargs)


def training_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Teacher: plain SDPA. Student: causal attention biased by `(t - i) * log beta_i`."""
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    call = kwargs.pop(ATTENTION_CALL_KEY, None)
    if call is not None and call.state.teacher:
        dense = attention_mask.dense() if isinstance(attention_mask, LazyCausalMask) else attention_mask
        return sdpa_attention_forward(module, query, key, value, dense, dropout=dropout, scaling=scaling, **kwargs)
    log_beta = call.log_beta if call is not None else None
    if log_beta is None or log_beta.shape[1] != key.shape[2] or not isinstance(attention_mask, TrainingMask):
        raise RuntimeError(
            f"{TRAIN_ATTENTION_NAME} attention needs the gates' log beta for every key and the mask from its own "
            "mask entry: call the model without a KV cache (use_cache=False) and without a prebuilt 4D mask"
        )
    if call.state.train_backend == "flex":
        out = biased_flex_attention(query, key, value, log_beta, attention_mask.block_mask(), scaling)
    else:
        out = biased_attention(query, key, value, log_beta, attention_mask.boolean(), scaling)
    return out.transpose(1, 2).contiguous(), None


def register_training_attention() -> None:
    AttentionInterface.register(TRAIN_ATTENTION_NAME, training_attention)
    AttentionMaskInterface.register(TRAIN_ATTENTION_NAME, training_mask)


def resolve_backend(backend: str, device) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    on_cuda = str(device).startswith("cuda")
    if backend == "flex" and not on_cuda:
        raise ConfigError("attention: flex needs CUDA (FlexAttention has no backward pass on CPU); use plain or auto")
    if backend == "auto":
        return "flex" if on_cuda else "plain"
    return backend


def enable_training_attention(model, backend: str = "auto") -> str:
    """Switch the text attention of a gated model to `dbtrimkv_train`; returns the backend used."""
    if not hasattr(text_attention_modules(model)[0], "retention_gate"):
        raise ConfigError("the model has no retention gates: call attach_retention_gates first")
    backend = resolve_backend(backend, next(model.parameters()).device)
    register_training_attention()
    state = model_state(model)
    state.train_backend, state.teacher = backend, False
    set_text_attention(model, TRAIN_ATTENTION_NAME)
    return backend


def disable_training_attention(model) -> None:
    """Back to the inference attention (`dbtrimkv`) that `attach_retention_gates` installed."""
    model_state(model).train_backend = None
    set_text_attention(model, RETENTION_ATTENTION)


@contextmanager
def teacher_attention(model):
    """Inside this block the text attention ignores the gates: the frozen full-attention teacher."""
    state = model_state(model)
    state.teacher = True
    try:
        yield model
    finally:
        state.teacher = False
