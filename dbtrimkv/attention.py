"""Glue between transformers' attention and the retention cache.

Why: we must not copy model files, yet the text attention has to (1) feed each layer's gate the
attention input, (2) tell the cache which new tokens are padding and what modality they are, and
(3) attend over the cache's slot pool instead of a dense K/V tensor. transformers 5.x lets us do
this from outside:

- a forward pre-hook on every text attention module runs its `retention_gate` and hands
  `log beta` (plus the query padding mask) to the cache before the attention calls its
  `update(...)` (the cache arrives as `cache=` from transformers 5.24, `past_key_values=` before);
- a pre-hook on the top-level model records the modality (text / image / video) of the tokens
  about to be processed, from the input ids;
- an attention function registered as `dbtrimkv` in `AttentionInterface`, with a matching entry in
  `AttentionMaskInterface`: with a `DBTrimKVCache` it attends through the slot tables; with any other
  cache (or none, e.g. training) it is plain SDPA with the usual causal mask, so the model runs
  unchanged. The mask entry returns a lazy object: the dense causal mask is only built on the SDPA
  path, never for the retention cache (where it would be q x logical-length).
The vision tower keeps `sdpa`.
"""

from __future__ import annotations

import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache import DBTrimKVCache
from .model_anatomy import RETENTION_ATTENTION, set_text_attention, text_attention_modules, text_decoder
from .model_state import model_state
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


def active_cache(module):
    ref = getattr(module, "_dbtrimkv_cache_ref", None)
    return ref() if ref is not None else None


def retention_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention through the retention cache when one is active, else SDPA."""
    cache = active_cache(module)
    if cache is not None:
        out = cache.attend(module.layer_idx, query, scaling if scaling is not None else query.shape[-1] ** -0.5)
        return out.transpose(1, 2).contiguous(), None
    if isinstance(attention_mask, LazyCausalMask):
        attention_mask = attention_mask.dense()
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register_attention() -> None:
    AttentionInterface.register(RETENTION_ATTENTION, retention_attention)
    AttentionMaskInterface.register(RETENTION_ATTENTION, retention_mask)


def _attention_pre_hook(module, args, kwargs):
    """Run the gate on the attention input; stage log beta and padding into a retention cache."""
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    log_beta = module.retention_gate(hidden_states)
    module.retention_log_beta = log_beta  # [B, T, H_kv], read by training-time attention
    cache = cache_from_call(kwargs)
    if isinstance(cache, DBTrimKVCache):
        mask = kwargs.get("attention_mask")
        padding = mask.query_padding if isinstance(mask, LazyCausalMask) else None
        cache.stage(module.layer_idx, log_beta, padding, hidden_states.dtype)
        module._dbtrimkv_cache_ref = weakref.ref(cache)
    else:
        module._dbtrimkv_cache_ref = None


def _attention_post_hook(module, args, kwargs, output):
    module._dbtrimkv_cache_ref = None


def _decoder_pre_hook(decoder, args, kwargs):
    """Remember how far a retention cache had got, to check after the forward that it was used."""
    cache = cache_from_call(kwargs)
    decoder._dbtrimkv_columns_before = cache.columns if isinstance(cache, DBTrimKVCache) else None


def _decoder_post_hook(decoder, args, kwargs, output):
    """A retention cache handed to the decoder must have received this forward's tokens: if the
    attention modules never called it (a transformers release that changed how the cache reaches
    them), fail loudly instead of running without a cache."""
    before = getattr(decoder, "_dbtrimkv_columns_before", None)
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
    handles = model_state(model).hook_handles
    for module in text_attention_modules(model):
        handles.append(module.register_forward_pre_hook(_attention_pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(_attention_post_hook, with_kwargs=True))
    decoder = text_decoder(model)
    handles.append(decoder.register_forward_pre_hook(_decoder_pre_hook, with_kwargs=True))
    handles.append(decoder.register_forward_hook(_decoder_post_hook, with_kwargs=True))
    handles.append(model.register_forward_pre_hook(_model_pre_hook, with_kwargs=True))
    set_text_attention(model, RETENTION_ATTENTION)
