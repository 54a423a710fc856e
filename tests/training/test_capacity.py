"""Capacity loss: chunked = O(T^2) reference (values and gradients), and the formula on a hand-worked case."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dbtrimkv.training.capacity import capacity_loss
from dbtrimkv.training.capacity_reference import capacity_loss_reference

L, B, T, H = 3, 3, 41, 2


def random_case(seed: int):
    gen = torch.Generator().manual_seed(seed)
    log_beta = F.logsigmoid(torch.randn(L, B, T, H, generator=gen) * 2 + 2)
    positions = torch.stack([
        torch.arange(T),  # one sequence
        torch.cat([torch.arange(25), torch.arange(16)]),  # two packed sequences
        torch.cat([torch.arange(33), torch.arange(8)]),  # one sequence + 8 padding tokens (own pseudo-sequence)
    ])
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[2, 33:] = False
    return log_beta, positions, valid


@pytest.mark.parametrize("mode", ["head", "global"])
@pytest.mark.parametrize("memory_size, chunk", [(4, 1), (4, 7), (12, 16), (12, None)])
def test_chunked_equals_reference(mode, memory_size, chunk):
    log_beta, positions, valid = random_case(memory_size + (chunk or 0))
    mine = log_beta.clone().requires_grad_()
    ref = log_beta.clone().requires_grad_()
    got = capacity_loss(mine, positions, valid, memory_size, mode, chunk=chunk)
    expected = capacity_loss_reference(ref, positions, valid, memory_size, mode)
    assert got.loss.item() > 1e-3  # the hinge is active: the comparison is not 0 == 0
    torch.testing.assert_close(got.loss, expected, rtol=1e-5, atol=1e-7)
    got.loss.backward()
    expected.backward()
    assert ref.grad.abs().sum() > 1e-3
    torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-4, atol=1e-7)


def test_formula_on_a_hand_worked_case():
    # One layer, one head, beta = 1/2 everywhere, M = 1: S_t = 1, 1.5, 1.75, 1.875.
    log_beta = torch.full((1, 1, 4, 1), 0.5).log()
    positions, valid = torch.arange(4)[None], torch.ones(1, 4, dtype=torch.bool)
    # hinge_t = max(0, S_t - 1) / max(t - 1, 1) = 0, 0.5, 0.75, 0.4375
    expected = (0 + 0.5 + 0.75 + 0.4375) / 4
    for mode in ("head", "global"):  # with L = H = 1 the two coincide
        result = capacity_loss(log_beta, positions, valid, 1, mode)
        assert result.loss.item() == pytest.approx(expected)
        assert capacity_loss_reference(log_beta, positions, valid, 1, mode).item() == pytest.approx(expected)
    assert result.mean_mass_ratio.item() == pytest.approx((1 + 1.5 + 1.75 + 1.875) / 4)


def test_global_lets_heads_trade_capacity():
    # Head 0 keeps everything (beta = 1), head 1 forgets at once (beta ~ 0): per head, head 0 is over budget;
    # globally S_0 + S_1 = (t + 1) + 1 stays within 2M = 8 for t <= 6.
    log_beta = torch.stack([torch.zeros(7), torch.full((7,), -30.0)], dim=-1)[None, None]  # [1, 1, 7, 2]
    positions, valid = torch.arange(7)[None], torch.ones(1, 7, dtype=torch.bool)
    assert capacity_loss(log_beta, positions, valid, 4, "head").loss.item() > 0.05
    assert capacity_loss(log_beta, positions, valid, 4, "global").loss.item() == 0.0
