"""Glue between transformers' attention and the retention cache.

Why: we must not copy model files, yet the text attention has to (1) feed each layer's gate the
attention input, (2) tell the cache which new tokens are padding and what modality they are, and
(3) attend over the cache's slot pool instead of a dense K/V tensor. transformers 5.x lets us do
this from outside:

- a forward pre-hook on every text attention module hands its `retention_gate` and the attention
  input (plus the query padding mask) to the cache, which runs the gate (or, decoding, defers it:
  `cache/deferred_gates.py`), before the attention calls its `update(...)` (the cache arrives as `cache=` from transformers 5.24, `past_key_values=` before),
  and passes the attention function what it needs for this call as one keyword argument,
  `dbtrimkv=AttentionCall(...)` (the model's record, the layer's log beta, the cache): the
  attention modules forward their extra keyword arguments to the attention function, so nothing
  is parked on the modules between the hook and the attention;
- a pre-hook on the top-level model records the modality (text / image / video) of the tokens
  about to be processed, from the input ids;
- an attention function registered as `dbtrimkv` in `AttentionInterface`, with a matching entry in
  `AttentionMaskInterface`: with a `DBTrimKVCache` it attends through the slot tables; with any other
  cache (or none, e.g. training) it is plain SDPA with the usual causal mask, so the model runs
  unchanged. The mask entry returns a lazy object: the dense causal mask is only built on the SDPA
  path, never for the retention cache (where it would be q x logical-length).
The vision tower keeps `sdpa`. The hooks are bound to the model's `ModelState` (the one typed
record of what dbtrimkv attached); the gates' last output per layer of a forward without a
retention cache is kept there (`ModelState.log_beta`, read by the training loss; with a cache it
goes to the pool only), and no `_dbtrimkv_*` attribute is set on any
module (tests/engine/test_no_module_side_channels.py checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..cache import DBTrimKVCache
from .model_anatomy import RETENTION_ATTENTION, set_text_attention, text_attention_modules, text_decoder
from .model_state import ModelState, model_state
from .transformers_compat import cache_from_call, integration_error


class LazyCausalMask:
    """What the `dbtrimkv` mask entry returns: the mask arguments, materialised only on demand."""

    def __init__(self, mask_kwargs: dict):
        self.mask_kwargs = mask_kwargs
        self._dense = None
        self._built = False

    @property
    def query_padding(self) -> torch.Tensor | None:
        """`[B, q]` bool, True for real (non-padding) query tokens; None when there is no padding mask."""
        mask = self.mask_kwargs.get("attention_mask")
        if mask is None or mask.ndim != 2:
            return None
        return mask[:, -self.mask_kwargs["q_length"]:].bool()

    def dense(self):
        """The mask SDPA would have received (None when causal attention needs no mask)."""
        if not self._built:
            self._dense = sdpa_mask(**self.mask_kwargs)
            self._built = True
        return self._dense


def retention_mask(**mask_kwargs) -> LazyCausalMask:
    return LazyCausalMask(mask_kwargs)


ATTENTION_CALL_KEY = "dbtrimkv"  # the keyword the attention pre-hook adds to the attention's call


@dataclass(frozen=True)
class AttentionCall:
    """What one text attention call needs from dbtrimkv, built by its pre-hook."""

    state: ModelState  # the model's record (training flags)
    log_beta: torch.Tensor | None  # [B, T, H_kv] this layer's gate output (None: deferred by the cache)
    cache: DBTrimKVCache | None  # the retention cache of this forward, if any


def retention_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention through the retention cache when one is active, else SDPA."""
    call = kwargs.pop(ATTENTION_CALL_KEY, None)
    cache = call.cache if call is not None else None
    if cache is not None:
        out = cache.attend(module.layer_idx, query, scaling if scaling is not None else query.shape[-1] ** -0.5)
        return out.transpose(1, 2).contiguous(), None
    if isinstance(attention_mask, LazyCausalMask):
        attention_mask = attention_mask.dense()
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register_attention() -> None:
    AttentionInterface.register(RETENTION_ATTENTION, retention_attention)
    AttentionMaskInterface.register(RETENTION_ATTENTION, retention_mask)


def _attention_pre_hook(state: ModelState, module, args, kwargs):
    """Run the gate on the attention input; stage log beta and padding into a retention cache; hand
    the attention function its `AttentionCall`."""
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    cache = cache_from_call(kwargs)
    if not isinstance(cache, DBTrimKVCache):
        cache = None
        log_beta = module.retention_gate(hidden_states)  # [B, T, H_kv]
        state.log_beta[module.layer_idx] = log_beta  # training / plain calls: the training loss reads it
    else:  # the cache runs the gate (or defers it) and keeps log beta in its pool
        mask = kwargs.get("attention_mask")
        padding = mask.query_padding if isinstance(mask, LazyCausalMask) else None
        log_beta = cache.stage(module.layer_idx, module.retention_gate, hidden_states, padding)
    return args, {**kwargs, ATTENTION_CALL_KEY: AttentionCall(state, log_beta, cache)}


def _decoder_pre_hook(state: ModelState, decoder, args, kwargs):
    """Remember how far a retention cache had got, to check after the forward that it was used."""
    cache = cache_from_call(kwargs)
    state.columns_before = cache.columns if isinstance(cache, DBTrimKVCache) else None


def _decoder_post_hook(state: ModelState, decoder, args, kwargs, output):
    """A retention cache handed to the decoder must have received this forward's tokens: if the
    attention modules never called it (a transformers release that changed how the cache reaches
    them), fail loudly instead of running without a cache."""
    before, state.columns_before = state.columns_before, None
    cache = cache_from_call(kwargs)
    if before is not None and isinstance(cache, DBTrimKVCache) and cache.columns == before:
        raise integration_error("the text decoder ran without passing its tokens to the DBTrimKVCache")


def _model_pre_hook(model, args, kwargs):
    """Record the modality of the tokens this forward will add. A placeholder id is an image / video
    token only in a call that carries that modality's pixels: a generated `<|image_pad|>` is text."""
    cache = cache_from_call(kwargs)
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(cache, DBTrimKVCache) and isinstance(input_ids, torch.Tensor):
        cache.note_input_ids(input_ids, images=kwargs.get("pixel_values") is not None,
                             videos=kwargs.get("pixel_values_videos") is not None)


def install_retention_attention(model) -> None:
    """Register hooks (their handles go to the model's `ModelState`) and switch the text attention
    (only) to `dbtrimkv`."""
    register_attention()
    state = model_state(model)
    handles = state.hook_handles
    for module in text_attention_modules(model):
        handles.append(module.register_forward_pre_hook(partial(_attention_pre_hook, state), with_kwargs=True))
    decoder = text_decoder(model)
    handles.append(decoder.register_forward_pre_hook(partial(_decoder_pre_hook, state), with_kwargs=True))
    handles.append(decoder.register_forward_hook(partial(_decoder_post_hook, state), with_kwargs=True))
    handles.append(model.register_forward_pre_hook(_model_pre_hook, with_kwargs=True))
    set_text_attention(model, RETENTION_ATTENTION)
