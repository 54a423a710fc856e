"""Distillation losses on response tokens: forward KL to the teacher, and next-token loss.

Why: the gates should change the model's answers as little as possible while forgetting, so the
student (retention-biased attention) is pulled towards the teacher (same weights, full attention)
with `KL(teacher || student)` over the full vocabulary. `fwkl_ntp` adds the usual next-token loss
on the reference response, averaged with the KL.

Logits are only formed at the positions that predict a response token, and in chunks of
`chunk` positions under activation checkpointing, so a 150k vocabulary never needs
`[T, V]` float32 logits at once (16k tokens x 152k x 4 bytes would be 10 GB per copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSS_KINDS = ("fwkl", "fwkl_ntp")


@dataclass
class Distillation:
    kl: torch.Tensor  # mean over response tokens of KL(teacher || student)
    ntp: torch.Tensor  # mean next-token cross-entropy of the student

    def loss(self, kind: str) -> torch.Tensor:
        return self.kl if kind == "fwkl" else 0.5 * (self.kl + self.ntp)


def _chunk_sums(lm_head, student_hidden, teacher_hidden, targets):
    student = F.log_softmax(lm_head(student_hidden).float(), dim=-1)
    with torch.no_grad():
        teacher = F.log_softmax(lm_head(teacher_hidden).float(), dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum()
    ntp = -student.gather(-1, targets[:, None]).sum()
    return torch.stack([kl, ntp])


def distillation_losses(lm_head, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                        targets: torch.Tensor, chunk: int = 1024) -> Distillation:
    """Losses from final hidden states `[N, D]` at the N loss positions and their next tokens `[N]`."""
    count = targets.numel()
    if count == 0:
        zero = student_hidden.sum() * 0.0
        return Distillation(zero, zero)
    sums = []
    for lo in range(0, count, chunk):
        part = slice(lo, lo + chunk)
        sums.append(checkpoint(_chunk_sums, lm_head, student_hidden[part], teacher_hidden[part], targets[part],
                               use_reentrant=False))
    kl, ntp = torch.stack(sums).sum(0) / count
    return Distillation(kl, ntp)
