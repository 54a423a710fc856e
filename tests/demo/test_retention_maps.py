"""`dbtrimkv.reporting.retention_maps` on hand-made caches (exact counts and colours) and on a real bounded cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_image
from PIL import Image

from dbtrimkv.settings.config import DBTrimKVConfig
from dbtrimkv.pipeline import DBTrimKVPipeline
from dbtrimkv.reporting.retention_maps import (
    head_heatmap,
    image_patch_survival,
    image_token_positions,
    logical_positions,
    overlay,
    survival_counts,
)

IMG = 99
VIRIDIS_LOW, VIRIDIS_HIGH = (68, 1, 84), (253, 231, 37)  # viridis(0.0), viridis(1.0)


class KeptCache:
    """The two introspection methods the maps read, over fixed retained positions per (layer, head)."""

    def __init__(self, kept: list[list[list[int]]]):
        self.kept = kept

    def retained_positions(self, batch_index: int = 0):
        return [[torch.tensor(p, dtype=torch.long) for p in layer] for layer in self.kept]

    def retained_per_head(self, batch_index: int = 0):
        return torch.tensor([[len(p) for p in layer] for layer in self.kept])


# Two padding columns (one holding an image id, which must be ignored), then logical positions 0..8:
# text 0, image A at 1-4 (grid 1x4x4, merge 2 -> 2x2 tokens), text 5, image B at 6-7 (grid 1x2x4 -> 1x2), text 8.
IDS = torch.tensor([IMG, 0, 5, IMG, IMG, IMG, IMG, 7, IMG, IMG, 8])
MASK = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1])
GRIDS = torch.tensor([[1, 4, 4], [1, 2, 4]])
CACHE = KeptCache([[[1, 2, 6], [1]], [[1, 4, 7], []]])  # 2 layers x 2 KV heads


def test_logical_positions_skip_padding():
    assert logical_positions(MASK).tolist() == [-1, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8]


def test_image_token_positions_split_by_grid():
    a, b = image_token_positions(IDS, MASK, IMG, GRIDS, merge_size=2)
    assert a.tolist() == [1, 2, 3, 4] and b.tolist() == [6, 7]
    with pytest.raises(ValueError, match="6 image tokens, but the grids describe 8"):
        image_token_positions(IDS, MASK, IMG, torch.tensor([[1, 4, 4], [1, 4, 4]]), merge_size=2)


def test_survival_counts_and_patch_grid():
    assert survival_counts(CACHE, torch.tensor([0, 1, 2, 4, 7])).tolist() == [0, 3, 1, 1, 1]
    first = image_patch_survival(CACHE, IDS, MASK, IMG, GRIDS, image_index=0, merge_size=2)
    assert first.tolist() == [[3, 1], [0, 1]]
    latest = image_patch_survival(CACHE, IDS, MASK, IMG, GRIDS, merge_size=2)
    assert latest.tolist() == [[1, 1]]
    with pytest.raises(IndexError):
        image_patch_survival(CACHE, IDS, MASK, IMG, GRIDS, image_index=2, merge_size=2)


def test_overlay_colours_each_patch():
    image = Image.new("RGB", (40, 20), (100, 100, 100))
    counts = torch.tensor([[0, 4], [2, 4]])
    solid = np.asarray(overlay(image, counts, max_count=4, alpha=1.0))
    assert solid.shape == (20, 40, 3)
    assert tuple(solid[0, 0]) == VIRIDIS_LOW and tuple(solid[9, 19]) == VIRIDIS_LOW  # whole top-left patch
    assert tuple(solid[0, 39]) == VIRIDIS_HIGH and tuple(solid[19, 39]) == VIRIDIS_HIGH
    assert tuple(solid[19, 0]) not in (VIRIDIS_LOW, VIRIDIS_HIGH)
    blended = np.asarray(overlay(image, counts, max_count=4, alpha=0.5)).astype(int)
    assert np.abs(blended[0, 0] - (np.array(VIRIDIS_LOW) + 100) / 2).max() <= 1
    assert np.asarray(overlay(image, counts, max_count=4, alpha=0.0)).max() == 100
    with pytest.raises(ValueError, match="max_count"):
        overlay(image, counts, max_count=0)


def test_head_heatmap_draws_every_cell():
    picture = head_heatmap(CACHE)  # counts [[3, 1], [3, 0]]
    assert picture.mode == "RGB" and picture.size == (350, 210)
    pixels = np.asarray(picture).reshape(-1, 1, 3).astype(int)

    def area(colour):  # pixels within 2 levels of a colour
        return int((np.abs(pixels - np.array(colour)).max(-1) <= 2).sum())

    cell = area(VIRIDIS_LOW)  # the one empty head
    assert cell > 1000
    assert 1.8 * cell < area(VIRIDIS_HIGH) < 2.2 * cell  # two heads kept the most (3 entries)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # axes, labels, colour bar


@pytest.mark.parametrize("budget", [None, 40])
def test_maps_account_for_every_retained_image_entry(budget):
    """Over a real two-turn conversation, the patch counts of all images add up to the cache's image entries."""
    pipe = DBTrimKVPipeline.from_pretrained("tiny", config=DBTrimKVConfig(budget=budget))  # None: full cache
    conv = pipe.conversation()
    images = [random_image(1, 64, 96), random_image(2, 96, 64)]
    grids = []
    for image in images:
        conv.send("What is in this picture?", images=[image], max_new_tokens=4, progress=False)
        grids.append(pipe.build_inputs([{"role": "user", "content": [{"type": "image", "image": image}]}])
                     ["image_grid_thw"][0])
    cache, grids = conv.cache, torch.stack(grids)
    ids, mask = cache.known_tokens(1, "cpu")
    lh = cache.segments_per_sequence
    maps = [image_patch_survival(cache, ids[0], mask[0], cache.image_token_id, grids, image_index=i)
            for i in range(len(images))]
    for counts, (_, h, w) in zip(maps, grids.tolist()):
        assert counts.shape == (h // 2, w // 2)
        assert 0 <= counts.min() and counts.max() <= lh
    assert sum(int(m.sum()) for m in maps) == cache.retained_by_modality(0)["image"]
    if budget is None:
        assert all(bool((m == lh).all()) for m in maps)
    else:
        assert cache.num_entries(0) < cache.full_cache_entries(0)
    assert head_heatmap(cache).size == (350, 240)  # 3 layers x 2 KV heads
