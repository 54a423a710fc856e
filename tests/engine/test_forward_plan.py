"""`ForwardPlan.unpadded` (the fast path for inputs without padding) against `ForwardPlan.build`, the
plain reference over an all-True mask, on random shapes."""

import pytest
import torch

from dbtrimkv.cache.forward_plan import ForwardPlan


@pytest.mark.parametrize("seed", range(6))
def test_unpadded_plan_equals_build_over_a_full_mask(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, length = (int(x) for x in torch.randint(1, 7, (2,), generator=gen))
    seen = torch.randint(0, 1000, (batch,), generator=gen)
    modality = torch.randint(0, 3, (batch, length), generator=gen).to(torch.int8)
    fast = ForwardPlan.unpadded(batch, length, seen, modality)
    plain = ForwardPlan.build(torch.ones(batch, length, dtype=torch.bool), seen, modality)
    for name in ForwardPlan.__dataclass_fields__:
        got, want = getattr(fast, name), getattr(plain, name)
        assert got.dtype == want.dtype, name
        assert torch.equal(got, want), name


def test_unpadded_plan_positions_continue_each_row():
    plan = ForwardPlan.unpadded(2, 3, torch.tensor([5, 0]), torch.zeros(2, 3, dtype=torch.int8))
    assert plan.query_positions.tolist() == [[5, 6, 7], [0, 1, 2]]
    assert plan.token_batch.tolist() == [0, 0, 0, 1, 1, 1]
    assert plan.new_tokens.tolist() == [3, 3]
