"""Comparing bf16 / fp16 runs: a tolerance derived from the dtype's rounding, and greedy-token checks
that allow a flip only where the reference itself had a tie at that precision.

Why these rules. In fp32 the engine and transformers agree to 1e-4. In bf16 / fp16 every layer
re-rounds its activations to the dtype, and the engine sums attention in a different order
(slot-pool gather + SDPA over a padded tensor vs. SDPA over contiguous K/V), so two correct runs
differ by a few units in the last place (ulp) of each activation. The logits are produced in the
model dtype, so their differences are measured in ulps of the largest logit: observed <= 2 ulp
(2-layer models, 16 decode steps); we allow `ULPS` = 4. One ulp of a value in [2^e, 2^(e+1)) is
2^(e - mantissa bits): bf16 has 7 mantissa bits (2^-7 = 0.8% relative), fp16 10 (0.1%).
A random model's top-2 logits can lie within that tolerance of each other, so greedy tokens may
legitimately differ: `assert_same_greedy` compares them step by step and accepts the first
difference only where the reference's own top-2 gap is within the tolerance (then stops, as both
continue from different tokens).
"""

from __future__ import annotations

import math

import torch

MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
ULPS = 4


def logit_tolerance(logits: torch.Tensor, dtype: torch.dtype) -> float:
    """`ULPS` units in the last place of the largest |logit| in `dtype`."""
    top = float(logits.float().abs().max())
    exponent = math.floor(math.log2(top)) if top > 0 else 0
    return ULPS * 2.0 ** (exponent - MANTISSA_BITS[dtype])


def assert_logits_close(ours: list[torch.Tensor], ref: list[torch.Tensor], dtype: torch.dtype, steps: int) -> int:
    """Per-step logits within tolerance for the first `steps` steps; returns the largest diff in ulps
    (for the message)."""
    worst = 0.0
    for step in range(steps):
        tol = logit_tolerance(ref[step], dtype)
        diff = float((ours[step].float() - ref[step].float()).abs().max())
        assert diff <= tol, f"step {step}: logits differ by {diff:.4g} > {tol:.4g} ({ULPS} ulp in {dtype})"
        worst = max(worst, diff / tol * ULPS)
    return worst


def first_divergence(ours: torch.Tensor, ref: torch.Tensor, ref_logits: list[torch.Tensor], dtype) -> int:
    """Number of generated steps over which `ours` and `ref` agree for every row; asserts that a
    divergence happens only at a step where the reference's top-2 logits are a tie at `dtype`."""
    steps = len(ref_logits)
    gen_ours, gen_ref = ours[:, -steps:], ref[:, -steps:]
    for step in range(steps):
        differ = gen_ours[:, step] != gen_ref[:, step]
        if bool(differ.any()):
            top2 = ref_logits[step].float().topk(2, dim=-1).values
            gap = (top2[:, 0] - top2[:, 1])[differ]
            tol = 2 * logit_tolerance(ref_logits[step], dtype)
            assert bool((gap <= tol).all()), (
                f"greedy tokens differ at step {step} although the reference's top-2 gap {gap.tolist()} "
                f"exceeds the {dtype} tolerance {tol:.4g}")
            return step
    return steps
