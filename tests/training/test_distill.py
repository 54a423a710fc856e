"""Distillation losses: forward KL(teacher || student) and next-token loss, chunked = unchunked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dbtrimkv.training.distill import distillation_losses


def case(seed: int = 0, n: int = 11, d: int = 8, vocab: int = 23):
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(d, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, d, generator=gen))
    student = torch.randn(n, d, generator=gen).requires_grad_()
    teacher = 3 * torch.randn(n, d, generator=gen)  # a sharper teacher: forward and reverse KL differ
    targets = torch.randint(0, vocab, (n,), generator=gen)
    return head, student, teacher, targets


def test_values_are_forward_kl_and_cross_entropy():
    head, student, teacher, targets = case()
    losses = distillation_losses(head, student, teacher, targets, chunk=4)
    log_s, log_t = F.log_softmax(head(student), -1), F.log_softmax(head(teacher), -1)
    forward_kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")  # KL(teacher || student)
    reverse_kl = F.kl_div(log_t, log_s, log_target=True, reduction="batchmean")
    assert losses.kl.item() == pytest.approx(forward_kl.item(), rel=1e-5)
    assert abs(forward_kl.item() - reverse_kl.item()) > 1e-2  # the direction matters on this case
    assert losses.ntp.item() == pytest.approx(F.cross_entropy(head(student), targets).item(), rel=1e-5)
    assert losses.loss("fwkl") is losses.kl
    assert losses.loss("fwkl_ntp").item() == pytest.approx(0.5 * (losses.kl.item() + losses.ntp.item()))


def test_chunking_changes_nothing_and_only_the_student_gets_gradients():
    head, student, teacher, targets = case(1)
    grads = []
    for chunk in (3, 1024):
        student.grad = None
        losses = distillation_losses(head, student, teacher, targets, chunk=chunk)
        losses.loss("fwkl_ntp").backward()
        grads.append((losses.kl.detach(), student.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert grads[0][1].abs().sum() > 0 and head.weight.grad is not None  # the frozen head is frozen by the caller
