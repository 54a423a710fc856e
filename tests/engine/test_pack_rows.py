"""`forward.pack_rows`: rows that need no padding (a decode step) are stacked in one call per tensor;
the result must equal the row-by-row reference `pad_rows` on random rows, and ragged rows still pad."""

import pytest
import torch

from dbtrimkv.runner.forward import RowInput, pack_rows, pad_rows


def _rows(counts, vision_language, generator):
    rows = []
    for n in counts:
        ids = torch.randint(0, 1000, (n,), generator=generator)
        types = torch.randint(0, 3, (n,), generator=generator).to(torch.int32)  # any integer dtype comes in
        shape = (4, n) if vision_language else (n,)
        rows.append(RowInput(ids, torch.randint(0, 5000, shape, generator=generator), types))
    return rows


@pytest.mark.parametrize("vision_language", [True, False])
@pytest.mark.parametrize("trial", range(6))
def test_stacked_rows_equal_the_padding_reference(vision_language, trial):
    generator = torch.Generator().manual_seed(1000 + trial)
    batch = int(torch.randint(1, 17, (1,), generator=generator))
    width = int(torch.randint(1, 5, (1,), generator=generator))
    rows = _rows([width] * batch, vision_language, generator)
    fast = pack_rows(rows, [width] * batch, width, vision_language, "cpu")
    slow = pad_rows(rows, [width] * batch, width, vision_language, "cpu")
    for got, want in zip(fast, slow):
        assert got.dtype == want.dtype == torch.long
        assert got.shape == want.shape
        assert torch.equal(got, want)


@pytest.mark.parametrize("vision_language", [True, False])
def test_ragged_rows_are_left_padded(vision_language):
    generator = torch.Generator().manual_seed(7)
    counts = [1, 0, 3]
    rows = _rows(counts, vision_language, generator)
    ids, mask, types, positions = pack_rows(rows, counts, 3, vision_language, "cpu")
    assert mask.tolist() == [[0, 0, 1], [0, 0, 0], [1, 1, 1]]
    assert ids[0, 2] == rows[0].ids[0] and torch.equal(ids[2], rows[2].ids) and not ids[1].any()
    assert torch.equal(types[2], rows[2].types.long())
    assert torch.equal(positions[..., 0, 2], rows[0].positions[..., 0]) and not positions[..., 1, :].any()


def test_rows_narrower_than_the_width_are_padded_even_if_all_equal():
    generator = torch.Generator().manual_seed(3)
    rows = _rows([1, 1], True, generator)
    ids, mask, _, _ = pack_rows(rows, [1, 1], 2, True, "cpu")
    assert ids.shape == (2, 2) and mask.tolist() == [[0, 1], [0, 1]]
