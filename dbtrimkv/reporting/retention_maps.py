"""Pictures of what the KV budget kept: per image patch, and per (layer, KV head).

Why: a budget is abstract; users trust eviction when they can see it. The demo (and anyone
inspecting a cache) shows (a) an uploaded image with each merged vision token coloured by how
many (layer, KV head) entries of it survive, and (b) a layer x head heatmap of retained entries.
These are pure functions of a cache's introspection (`retained_positions`, `retained_per_head`)
and the conversation's token ids, so they are tested with hand-made caches, not through a UI.

Mapping image tokens to cache entries: the cache stores logical positions (index of the token
among the real, non-padding tokens of the conversation). Image tokens are the ids equal to the
model's `image_token_id`; images appear in prompt order, each with `t * h * w / merge**2`
tokens in row-major order of merged patches (`image_grid_thw` rows are `(t, h, w)` in patches).

matplotlib (Agg canvas, no pyplot state) draws the pictures; it is imported only when one is drawn.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

COLORMAP = "viridis"


def logical_positions(token_mask: torch.Tensor) -> torch.Tensor:
    """Logical position of every column of one sequence: its index among the real tokens (-1 for padding)."""
    mask = token_mask.bool()
    return torch.where(mask, torch.cumsum(mask.long(), 0) - 1, torch.full_like(mask, -1, dtype=torch.long))


def image_token_positions(token_ids: torch.Tensor, token_mask: torch.Tensor, image_token_id: int,
                          image_grid_thw: torch.Tensor, merge_size: int) -> list[torch.Tensor]:
    """Logical positions of each image's vision tokens (one sequence), in patch row-major order.

    `token_ids`, `token_mask`: `[T]` for the whole conversation (e.g. from `cache.known_tokens`);
    `image_grid_thw`: `[N, 3]`, one row per image of the conversation, in order.
    """
    positions = logical_positions(token_mask)
    is_image = (token_ids == image_token_id) & token_mask.bool()
    found = positions[is_image]
    sizes = [int(t * h * w) // merge_size**2 for t, h, w in torch.as_tensor(image_grid_thw).tolist()]
    if sum(sizes) != found.numel():
        raise ValueError(f"the tokens hold {found.numel()} image tokens, but the grids describe {sum(sizes)}")
    return list(torch.split(found, sizes))


def survival_counts(cache, positions: torch.Tensor, batch_index: int = 0) -> torch.Tensor:
    """For each logical position: how many (layer, KV head) entries of it are still cached, in [0, L*H]."""
    counts = torch.zeros(positions.numel(), dtype=torch.long)
    for heads in cache.retained_positions(batch_index):
        for kept in heads:
            counts += torch.isin(positions, kept).long()
    return counts


def image_patch_survival(cache, token_ids: torch.Tensor, token_mask: torch.Tensor, image_token_id: int,
                         image_grid_thw: torch.Tensor, image_index: int = -1, batch_index: int = 0,
                         merge_size: int = 2) -> torch.Tensor:
    """`[h / merge, w / merge]` counts of surviving (layer, KV head) entries per merged image patch.

    Arguments are those of `image_token_positions` for sequence `batch_index` (pass its row of the
    token ids and mask); `image_index` picks the image (default: the latest one).
    """
    per_image = image_token_positions(token_ids, token_mask, image_token_id, image_grid_thw, merge_size)
    index = range(len(per_image))[image_index]
    _, h, w = torch.as_tensor(image_grid_thw)[index].tolist()
    counts = survival_counts(cache, per_image[index], batch_index)
    return counts.view(-1, h // merge_size, w // merge_size).sum(0)


def _colormap():
    import matplotlib

    return matplotlib.colormaps[COLORMAP]


def overlay(image: Image.Image, counts: torch.Tensor, max_count: int, alpha: float = 0.55) -> Image.Image:
    """The image with each patch tinted by `counts / max_count` (dark purple: evicted everywhere,
    yellow: kept by all `max_count` (layer, head) pairs). Patches are stretched to the image size."""
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    base = image.convert("RGB")
    level = (counts.to(torch.float64) / max_count).clamp(0, 1).numpy()
    colors = (_colormap()(level)[..., :3] * 255).round().astype(np.uint8)
    tint = Image.fromarray(colors).resize(base.size, Image.Resampling.NEAREST)
    return Image.blend(base, tint, alpha)


def head_heatmap(cache, batch_index: int = 0, title: str = "retained entries per layer and KV head") -> Image.Image:
    """A layer x KV-head heatmap of the entries each (layer, head) keeps, with counts written in."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    grid = cache.retained_per_head(batch_index).numpy()
    layers, heads = grid.shape
    fig = Figure(figsize=(min(2.5 + 0.5 * heads, 10), min(1.5 + 0.3 * layers, 12)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = ax.imshow(grid, cmap=COLORMAP, aspect="auto", vmin=0, vmax=max(int(grid.max()), 1))
    fig.colorbar(shown, ax=ax, label="entries")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    if layers * heads <= 128:  # numbers stay legible
        for (layer, head), value in np.ndenumerate(grid):
            ax.text(head, layer, str(value), ha="center", va="center", fontsize=7,
                    color="black" if value > grid.max() / 2 else "white")
    fig.tight_layout()
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
