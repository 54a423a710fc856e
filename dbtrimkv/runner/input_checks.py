"""Whether a prompt's processor outputs agree with each other and with the model, before any work.

Why: `input_ids`, `attention_mask`, `mm_token_type_ids`, the image and video placeholders, pixels and
grids come from a processor, or from a caller who built them by hand. When they disagree, the model
fails deep inside (an IndexError in the vision merge, a RuntimeError in a cat) or, worse, answers:
placeholders without pixels were read as text. `check_inputs` names the key at fault as a
ConfigError before the cache is touched, so a refused call leaves a conversation as it was. Cheap:
counts and shapes only.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .positions import is_vision_language


def check_inputs(model, inputs, fed_first: list[bool] = ()) -> None:
    """ConfigError naming the key at fault when `inputs`' attention_mask, mm_token_type_ids, image or video
    placeholders, pixels and grids do not agree (a traceback deep inside the model, or a silently wrong
    answer, otherwise). Cheap: counts and shapes only. `fed_first[b]`: row b has a pending token that goes
    first, so it may have no new real token."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
            shown = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ConfigError(f"attention_mask must have the shape of input_ids {list(ids.shape)}, got {shown}")
        if mask.dtype.is_complex or bool(((mask != 0) & (mask != 1)).any()):
            raise ConfigError("attention_mask must hold only 0 (padding) and 1 (a real token)")
        empty = [b for b in torch.nonzero(mask.sum(1) == 0).flatten().tolist() if not (b < len(fed_first) and fed_first[b])]
        if empty:
            raise ConfigError(f"attention_mask has no real token (no 1) in row(s) {empty}: every row needs at least one")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    types = inputs.get("mm_token_type_ids")
    if types is not None:
        if not isinstance(types, torch.Tensor) or tuple(types.shape) != tuple(ids.shape):
            shown = list(types.shape) if isinstance(types, torch.Tensor) else type(types).__name__
            raise ConfigError(f"mm_token_type_ids must have the shape of input_ids {list(ids.shape)}, got {shown}")
        if types.dtype.is_floating_point or types.dtype.is_complex or bool(((types < 0) | (types > 2)).any()):
            raise ConfigError("mm_token_type_ids must hold 0 (text), 1 (image) or 2 (video) per token")
        if types.shape[1] and bool(types[:, -1].any()):
            raise ConfigError("the prompt must end with a text token (e.g. the chat template's generation prompt)")
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", None)
    for kind, code, pixels_key, grid_key in (("image", 1, "pixel_values", "image_grid_thw"),
                                            ("video", 2, "pixel_values_videos", "video_grid_thw")):
        token_id = getattr(config, f"{kind}_token_id", None) if is_vision_language(model) else None
        placeholders = (ids == token_id) & real if token_id is not None else torch.zeros_like(real)
        count = int(placeholders.sum())
        pixels, grid = inputs.get(pixels_key), inputs.get(grid_key)
        if pixels is None and grid is None:
            if count:
                raise ConfigError(f"input_ids hold {count} {kind} placeholder tokens (id {token_id}) but inputs have no "
                                  f"{pixels_key} and {grid_key}: pass the processor's outputs for the {kind}s")
            continue
        if token_id is None:
            raise ConfigError(f"inputs hold {pixels_key if pixels is not None else grid_key}, but this model "
                              f"({type(model).__name__}) takes no {kind}s")
        for key, value in ((pixels_key, pixels), (grid_key, grid)):
            if value is None:
                raise ConfigError(f"inputs hold {grid_key if key == pixels_key else pixels_key} but no {key}")
            if not isinstance(value, torch.Tensor) or value.dim() != 2:
                raise ConfigError(f"{key} must be a 2-d tensor, got "
                                  f"{list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
        if grid.shape[1] != 3 or grid.dtype.is_floating_point or grid.dtype.is_complex or grid.dtype == torch.bool \
                or not bool((grid >= 1).all()):
            raise ConfigError(f"{grid_key} must be an integer tensor [{kind}s, 3] of positive (t, h, w), "
                              f"got shape {list(grid.shape)}")
        merge = getattr(vision, "spatial_merge_size", None) or model.model.visual.spatial_merge_size
        t, h, w = grid.long().unbind(1)
        if bool(((h % merge) != 0).any() or ((w % merge) != 0).any()):
            raise ConfigError(f"{grid_key}: h and w must be multiples of the spatial merge size {merge}, "
                              f"got {grid.tolist()}")
        patches = int((t * h * w).sum())
        if pixels.shape[0] != patches:
            raise ConfigError(f"{pixels_key} has {pixels.shape[0]} patches, but {grid_key} {grid.tolist()} needs "
                              f"{patches} (the sum of t*h*w)")
        width = None
        if vision is not None and all(hasattr(vision, a) for a in ("in_channels", "temporal_patch_size", "patch_size")):
            width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        if width is not None and pixels.shape[1] != width:
            raise ConfigError(f"{pixels_key} must have {width} values per patch (this model's vision config), "
                              f"got {pixels.shape[1]}")
        sizes = (t * h * w // merge**2).tolist()
        if count != sum(sizes):
            raise ConfigError(f"input_ids hold {count} {kind} placeholder tokens (id {token_id}), but {grid_key} "
                              f"{grid.tolist()} needs {sum(sizes)} (t*h*w / {merge}**2 per {kind})")
        _check_rows(placeholders.sum(1).tolist(), sizes, kind, grid_key)
        marked = (types == code) & real if types is not None else torch.zeros_like(real)
        if not torch.equal(marked, placeholders):
            raise ConfigError(f"mm_token_type_ids must mark exactly the {count} {kind} placeholder tokens with {code} "
                              "(pass the processor's mm_token_type_ids)")


def _check_rows(per_row: list[int], sizes: list[int], kind: str, grid_key: str) -> None:
    """The grid's items, taken in order, fill each row's placeholders exactly (the vision merge assigns them
    so): ConfigError naming the first row that would take part of an item, or another row's."""
    item = 0
    for row, wanted in enumerate(per_row):
        taken = 0
        while taken < wanted and item < len(sizes):
            taken, item = taken + sizes[item], item + 1
        if taken != wanted:
            raise ConfigError(f"row {row} holds {wanted} {kind} placeholder tokens, which are not whole {kind}s of "
                              f"{grid_key} taken in order (the {kind}s of each row must follow one another)")
