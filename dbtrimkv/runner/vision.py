"""Vision encoding on demand and its merge into a forward, chunk by chunk.

Why: a long video must not be encoded (or held) whole before the language model runs; each image or
video frame group is encoded by the vision tower only when a prefill chunk reaches its tokens (one
temporal slice at a time, which is what the tower computes anyway), and its features (embeddings and
deepstack) are merged into exactly that chunk's columns. `VisionStream` finds the runs of vision
tokens and encodes them; `VisionChunk` is one row's share of a chunk; `vision_inputs` is the one merge
of the rows' chunks into a left-padded batched forward (`forward.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..inputs.modality import Modality, VISUAL_MODALITIES


@dataclass
class VisionChunk:
    """The visual tokens of one row's chunk: which of its real tokens they are, their embeddings, deepstack."""

    mask: torch.Tensor  # [n] bool over the row's real tokens in the chunk
    embeds: torch.Tensor  # [visual tokens, hidden]
    deepstack: list[torch.Tensor]


@dataclass
class _VisualRun:
    """A run of consecutive vision tokens in one row: one image or one video frame group."""

    row: int
    start: int  # column of its first token (in the new-token columns)
    end: int
    item: int  # index into the vision stream's items


class VisionStream:
    """Encodes images / video frame groups on demand, in the order their tokens appear."""

    def __init__(self, model, inputs, types: torch.Tensor, mask: torch.Tensor):
        self.model = model
        self.merge = model.model.visual.spatial_merge_size
        self.mask = mask.bool()
        self.items: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (modality, pixel rows, grid [1, 3])
        for key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            self._add_items(inputs.get(key), inputs.get(grid_key), Modality.IMAGE if key == "pixel_values" else Modality.VIDEO)
        self.runs = self._find_runs(types, mask)
        self._encoded: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def _add_items(self, pixels, grids, code: int) -> None:
        if pixels is None or grids is None:
            return
        offset = 0
        for t, h, w in grids.tolist():
            for _ in range(t):  # each temporal slice is encoded on its own by the tower
                self.items.append((code, pixels[offset : offset + h * w], torch.tensor([[1, h, w]])))
                offset += h * w

    def _find_runs(self, types: torch.Tensor, mask: torch.Tensor) -> list[_VisualRun]:
        runs, next_item = [], {code: [i for i, it in enumerate(self.items) if it[0] == code] for code in VISUAL_MODALITIES}
        for row in range(types.shape[0]):
            codes = torch.where(mask[row].bool(), types[row], torch.zeros_like(types[row])).tolist()
            col = 0
            while col < len(codes):
                code = codes[col]
                end = col
                while end < len(codes) and codes[end] == code:
                    end += 1
                if code:
                    length = end - col
                    while length > 0:  # adjacent frame groups of one video share a run
                        if not next_item[code]:
                            raise ConfigError(f"more {Modality(code).label} tokens in the prompt than {Modality(code).label} inputs")
                        item = next_item[code].pop(0)
                        n = self._tokens(item)
                        runs.append(_VisualRun(row, end - length, end - length + n, item))
                        length -= n
                    if length < 0:
                        raise ConfigError(f"{Modality(code).label} tokens do not match the {Modality(code).label} grid sizes")
                col = end
        if any(next_item.values()):
            raise ConfigError("some images or videos have no placeholder tokens in the prompt")
        return runs

    def _tokens(self, item: int) -> int:
        _, _, grid = self.items[item]
        return int(grid.prod()) // self.merge**2

    def _encode(self, items: list[int]) -> None:
        VisionStream.encode([(self, items)])

    @staticmethod
    def encode(parts: list[tuple["VisionStream", list[int]]]) -> None:
        """Encode the given items of several streams in one call of the vision tower (a serving step's rows
        that reach an image each: one call, not one per request) and keep each stream's features. The tower
        encodes every image / frame group on its own (its attention does not cross them), so a stream gets
        the features it would get alone."""
        parts = [(stream, items) for stream, items in parts if items]
        if not parts:
            return
        visual = parts[0][0].model.model.visual
        pixels = torch.cat([s.items[i][1] for s, items in parts for i in items]).to(visual.device, visual.dtype)
        grids = torch.cat([s.items[i][2] for s, items in parts for i in items]).to(visual.device)
        out = visual(pixels, grid_thw=grids)
        sizes = [s._tokens(i) for s, items in parts for i in items]
        embeds = torch.split(out.pooler_output, sizes)
        deep = [torch.split(f, sizes) for f in out.deepstack_features]
        k = 0
        for stream, items in parts:
            for i in items:
                stream._encoded[i] = (embeds[k], [d[k] for d in deep])
                k += 1

    def _runs_in(self, spans: list[tuple[int, int]]) -> list[_VisualRun]:
        """The runs row b's columns `spans[b]` = [start, end) reach."""
        return [r for r in self.runs if r.start < spans[r.row][1] and r.end > spans[r.row][0]]

    def reached(self, spans: list[tuple[int, int]]) -> list[int]:
        """The items row b's columns `spans[b]` reach that are not encoded yet."""
        return [r.item for r in self._runs_in(spans) if r.item not in self._encoded]

    def chunks(self, spans: list[tuple[int, int]], device, dtype) -> list[VisionChunk | None]:
        """Each row's visual features for its columns `spans[row]` = [start, end), encoding what they reach
        (all rows' items in one call of the tower); None for a row whose span holds no vision token."""
        active = self._runs_in(spans)
        if not active:
            return [None] * len(spans)
        self._encode(self.reached(spans))
        out: list[VisionChunk | None] = []
        for row, (start, end) in enumerate(spans):
            pieces = sorted((r for r in active if r.row == row), key=lambda r: r.start)
            if not pieces:
                out.append(None)
                continue
            columns = torch.zeros(end - start, dtype=torch.bool)
            embeds, deep = [], []
            for r in pieces:
                lo, hi = max(r.start, start), min(r.end, end)
                columns[lo - start : hi - start] = True
                emb, feats = self._encoded[r.item]
                embeds.append(emb[lo - r.start : hi - r.start])
                deep.append([d[lo - r.start : hi - r.start] for d in feats])
            real = self.mask[row, start:end].cpu()
            out.append(VisionChunk(columns[real].to(device), torch.cat(embeds).to(device, dtype),
                                   [torch.cat([d[k] for d in deep]).to(device, dtype) for k in range(len(deep[0]))]))
        for r in active:
            if r.end <= spans[r.row][1]:
                del self._encoded[r.item]  # fully consumed
        return out


def vision_inputs(chunks: list[VisionChunk | None], counts: list[int], width: int, embeds: torch.Tensor):
    """Merge the rows' visual features into the embeddings of a left-padded forward (`counts[b]` real
    tokens of row b, right-aligned in `width` columns): returns (embeds, keyword arguments of the
    language model: visual mask and deepstack features, in row-major order like the mask's True entries)."""
    if all(chunk is None for chunk in chunks):
        return embeds, {}
    vmask = torch.zeros(len(chunks), width, dtype=torch.bool, device=embeds.device)
    pieces, deep = [], []
    for b, chunk in enumerate(chunks):
        if chunk is None:
            continue
        vmask[b, width - counts[b] :] = chunk.mask
        pieces.append(chunk.embeds)
        deep.append(chunk.deepstack)
    deepstack = [torch.cat([d[k] for d in deep]) for k in range(len(deep[0]))]
    embeds = embeds.masked_scatter(vmask[..., None], torch.cat(pieces).to(embeds.dtype))
    return embeds, {"visual_pos_masks": vmask, "deepstack_visual_embeds": deepstack}
