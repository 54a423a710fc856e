"""An encoded video saved to a file, to answer questions later without decoding the video again.

Why: encoding is the expensive part (decode every window, run the vision tower, prefill with
eviction); the compressed cache it leaves is bounded. Saving it (`cache/portable.py` format, with
what `EncodedVideo` knows beside it) lets `dbtrimkv video-qa --load-cache` and
`load_encoded(...)` ask new questions about an hour of video in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..cache.portable import load_cache, save_cache
from ..errors import CacheFileError, ConfigError
from .streaming import EncodedVideo, prompt_parts

KIND = "encoded-video"


def save_encoded(model, encoded: EncodedVideo, path: str | Path) -> int:
    """Write `encoded` (its compressed cache and the prefilled token ids) to `path`; returns bytes."""
    cache = encoded.cache
    ids = encoded.token_ids.to(torch.int64)[None] if encoded.token_ids is not None else None
    if ids is not None and ids.shape[1] == cache.columns and not torch.equal(cache.known_tokens(1, "cpu")[0], ids):
        cache = cache.clone()  # the saved cache knows its token ids (for retention plots); the original is untouched
        cache.record_tokens(ids, torch.ones_like(ids))
    extra = {"kind": KIND, "video": encoded.path, "prefix": encoded.prefix, "frames": encoded.frames,
             "frame_groups": encoded.frame_groups, "prompt_tokens": encoded.prompt_tokens, "seconds": encoded.seconds}
    return save_cache(model, cache, path, extra)


def load_encoded(model, processor, path: str | Path) -> EncodedVideo:
    """The `EncodedVideo` saved at `path`, checked against `model` (and its processor's chat template)."""
    cache, extra = load_cache(model, path)
    if extra.get("kind") != KIND:
        raise CacheFileError(f"{path} holds a {extra.get('kind', 'bare')} cache, not an encoded video "
                             "(save one with dbtrimkv video-qa --video X --save-cache FILE)")
    if prompt_parts(processor, "")[0] != extra["prefix"]:
        raise ConfigError(f"{path} was encoded with another chat template: its questions would not continue it")
    ids, mask = cache.known_tokens(1, "cpu")
    token_ids = ids[0][mask[0].bool()] if ids.shape[1] else None
    return EncodedVideo(extra["video"], cache, extra["prefix"], int(extra["frames"]), int(extra["frame_groups"]),
                        dict(extra["prompt_tokens"]), float(extra["seconds"]), token_ids)
