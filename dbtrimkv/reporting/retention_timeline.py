"""A retention timeline: which tokens of a conversation each layer still holds, and in how many heads.

Why: the per-image map and the layer x head heatmap (`retention_maps`) show how much is kept, not
*what over time*. On a video or a long chat the question is which moments survive: the TRIM-KV
paper reports sink tokens at the start, a recent window at the end, and a few content tokens kept
for long. The timeline shows exactly that: x = every token of the conversation in order (text,
image and video tokens marked in a strip below, video groups labelled with their timestamps),
y = layers, colour = how many KV heads of that layer still hold the token (0 .. H).

Token ids come from the caller (a conversation's `cache.known_tokens`, or the ids a video was
prefilled with), since a cache stores positions, not ids. Long conversations are drawn in at most
`max_columns` bins, each showing the most heads any of its tokens keeps, so a single kept token
stays visible in an hour of video.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from ..inputs.modality import MODALITY_NAMES, Modality
from .output_paths import check_writable_file

KIND_COLORS = {"text": "#b0b0b0", "image": "#1f77b4", "video": "#ff7f0e"}
_STAMP = re.compile(r"<\s*([0-9]+(?:\.[0-9]+)?)\s*seconds?\s*>")


@dataclass
class Timeline:
    """`heads[l, t]`: KV heads of layer l holding token t; `kinds[t]`: its `Modality` code;
    `stamps`: (token index, seconds) of each video frame group's first token."""

    heads: np.ndarray
    kinds: np.ndarray
    stamps: list[tuple[int, float]]
    num_kv_heads: int


def token_kinds(token_ids: torch.Tensor, image_token_id: int | None, video_token_id: int | None) -> np.ndarray:
    """The `Modality` code of each token id (image / video placeholder ids, else text)."""
    ids = torch.as_tensor(token_ids).cpu()
    kinds = torch.full(ids.shape, Modality.TEXT, dtype=torch.int8)
    if image_token_id is not None:
        kinds[ids == image_token_id] = Modality.IMAGE
    if video_token_id is not None:
        kinds[ids == video_token_id] = Modality.VIDEO
    return kinds.numpy()


def video_stamps(token_ids: torch.Tensor, kinds: np.ndarray, tokenizer, lookback: int = 16) -> list[tuple[int, float]]:
    """(first token index, seconds) of every run of video tokens whose preceding text holds a
    Qwen3-VL timestamp (`<12.5 seconds>`); runs without one are skipped."""
    ids = torch.as_tensor(token_ids).tolist()
    video = kinds == Modality.VIDEO
    starts = np.flatnonzero(video & ~np.concatenate([[False], video[:-1]]))
    out = []
    for start in starts.tolist():
        text = tokenizer.decode(ids[max(0, start - lookback):start])
        found = _STAMP.findall(text)
        if found:
            out.append((start, float(found[-1])))
    return out


def heads_per_layer(cache, num_tokens: int, batch_index: int = 0) -> np.ndarray:
    """`[L, num_tokens]`: for each layer and logical position, the KV heads still holding it."""
    counts = np.zeros((cache.num_layers, num_tokens), dtype=np.int64)
    for layer, heads in enumerate(cache.retained_positions(batch_index)):
        for kept in heads:
            kept = kept[(kept >= 0) & (kept < num_tokens)].numpy()
            counts[layer, kept] += 1
    return counts


def build(cache, token_ids: torch.Tensor, tokenizer, image_token_id: int | None = None,
          video_token_id: int | None = None, batch_index: int = 0) -> Timeline:
    """The timeline of sequence `batch_index` of `cache`; `token_ids`: its real tokens in order (1-D)."""
    ids = torch.as_tensor(token_ids).reshape(-1).cpu()
    kinds = token_kinds(ids, image_token_id, video_token_id)
    return Timeline(heads_per_layer(cache, ids.numel(), batch_index), kinds, video_stamps(ids, kinds, tokenizer),
                    cache.num_kv_heads)


def check_output(path: str | Path) -> Path:
    """`path` as a PNG destination whose folder exists and takes a new file (checked before any model is loaded)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"the retention plot is a PNG: give a path ending in .png, got {path}")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write the retention plot {path}: folder {path.parent} does not exist")
    return check_writable_file(path, "--retention-plot")


def save(cache, token_ids: torch.Tensor, tokenizer, path: str | Path, title: str = "retention timeline") -> Path:
    """Build the timeline of sequence 0 of `cache` and write it to `path` (PNG)."""
    plot(build(cache, token_ids, tokenizer, cache.image_token_id, cache.video_token_id), path, title=title)
    return Path(path)


def conversation_tokens(cache, batch_index: int = 0) -> torch.Tensor:
    """The real token ids a conversation's cache knows (recorded by `generate`), in order."""
    ids, mask = cache.known_tokens(max(cache.batch_size, 1), "cpu")
    return ids[batch_index][mask[batch_index].bool()]


def fork_tokens(prefilled: torch.Tensor, cache, batch_index: int = 0) -> torch.Tensor:
    """The token ids of a fork of a cache into which `prefilled` ids were prefilled (`prefill` does
    not record ids, so the fork knows them as zeros; its `generate` recorded the rest)."""
    known = conversation_tokens(cache, batch_index)
    return torch.cat([prefilled.reshape(-1).cpu(), known[prefilled.numel():]])


def _bins(length: int, max_columns: int) -> np.ndarray:
    """Bin edges over `length` tokens: one token per column if it fits, else `max_columns` bins."""
    return np.linspace(0, length, min(length, max_columns) + 1).round().astype(int)


def binned(timeline: Timeline, max_columns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(heads `[L, C]` = the most heads any token of a bin keeps, kind of each bin = its highest
    modality code (a video token among text marks the bin video), bin edges)."""
    edges = _bins(timeline.kinds.size, max_columns)
    heads = np.maximum.reduceat(timeline.heads, edges[:-1], axis=1) if timeline.kinds.size else timeline.heads
    kinds = np.maximum.reduceat(timeline.kinds.astype(np.int64), edges[:-1]) if timeline.kinds.size else timeline.kinds
    return heads, kinds, edges


def plot(timeline: Timeline, path: str | Path | None = None, title: str = "retention timeline",
         max_columns: int = 1600):
    """Draw the timeline (PIL image); write it to `path` (PNG) if given."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    heads, kinds, edges = binned(timeline, max_columns)
    layers = heads.shape[0]
    fig = Figure(figsize=(12, 1.6 + 0.35 * layers), dpi=110)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=[max(layers, 2), 0.6], width_ratios=[40, 1], hspace=0.08, wspace=0.02)
    ax, strip, bar = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[0, 1])
    shown = ax.imshow(heads, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0,
                      vmax=timeline.num_kv_heads, extent=(0, heads.shape[1], layers - 0.5, -0.5))
    fig.colorbar(shown, cax=bar, label="KV heads holding it", ticks=range(timeline.num_kv_heads + 1))
    ax.set_ylabel("layer")
    ax.set_yticks(range(layers))
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    strip.imshow(kinds[None, :], aspect="auto", interpolation="nearest",
                 cmap=ListedColormap([KIND_COLORS[k] for k in MODALITY_NAMES]), vmin=0, vmax=len(Modality) - 1,
                 extent=(0, heads.shape[1], 0, 1))
    strip.set_yticks([])
    _label_axis(strip, timeline, edges)
    handles = [_patch(KIND_COLORS[m.label], m.label) for m in Modality if (timeline.kinds == m).any()]
    strip.legend(handles=handles, fontsize=7, ncol=len(Modality), loc="upper right", bbox_to_anchor=(1.0, -0.9))
    fig.subplots_adjust(left=0.06, right=0.94, top=0.9, bottom=0.28)
    fig.canvas.draw()
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    if path is not None:
        image.save(path)
    return image


def _patch(color: str, label: str):
    from matplotlib.patches import Patch

    return Patch(color=color, label=label)


def _label_axis(ax, timeline: Timeline, edges: np.ndarray, ticks: int = 10) -> None:
    """Token indices on the x axis, or video timestamps when the conversation has video."""
    def column(token: int) -> float:
        return float(np.searchsorted(edges, token, side="right") - 1) + 0.5

    if timeline.stamps:
        picked = timeline.stamps[:: max(1, len(timeline.stamps) // ticks)]
        ax.set_xticks([column(t) for t, _ in picked], [f"{s:g}s" for _, s in picked], fontsize=7)
        ax.set_xlabel("tokens in order (video frames labelled with their time)")
    else:
        picked = np.linspace(0, timeline.kinds.size - 1, min(ticks, max(timeline.kinds.size, 1))).round().astype(int)
        ax.set_xticks([column(t) for t in picked], [str(t) for t in picked], fontsize=7)
        ax.set_xlabel("token")
