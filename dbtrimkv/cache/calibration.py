"""Retention calibration at inference: the gates' `log beta` as the cache stores and scores it.

Why: the gates learn `log beta` on training chats a few thousand tokens long; an hour of video is
tens of thousands. Two things then go wrong at a small budget (measured on the tiny recall model,
README "Long videos", M = 64):

- video frames are tens of thousands of tokens apart, so a frame that the gates rank far above the
  other frames (the digit frame, `log beta` ~ -0.002 against ~ -29) still decays below a window of
  recent text; `video_decay_scale` s in (0, 1] multiplies the `log beta` of video tokens: a frame
  decays as if the video were 1/s times shorter. Within the video tokens the order is unchanged.
- gates that saturate (`log beta` ~ -1e-17 for layer 1's timestamp `0` tokens, 0 in effect) keep
  an entry forever; a stream of them fills any fixed budget, the question included. `decay_floor`
  f >= 0 caps the `log beta` of text and image tokens at -f: every such entry decays at least
  that fast, so the oldest of the saturated entries leave first. Video tokens are left to the
  scale: a floor there ties the frames the gates rank highest (the digit frame in layer 2, `log
  beta` ~ -1e-13) with the many layer-0 frames just below the floor (~ -0.003), and the later of
  those then outlast the digit (measured, S = 0.1, F = 0.003, M = 64: 14 of 24 hour-long videos of
  seeds 2000-2023 with the floor on video tokens too, 17 without).

Both default to no change (s = 1, f = 0). They apply before the entry is stored, so every policy
and kernel scores the calibrated value and the eviction contract (docs/architecture.md) is
unchanged. Settings: `DBTrimKVConfig.video_decay_scale` and `decay_floor`.
"""

from __future__ import annotations

import torch

from ..inputs.modality import Modality

SETTINGS = ("video_decay_scale", "decay_floor")  # the `DBTrimKVConfig` fields of the calibration


def settings_from(args) -> dict:
    """The calibration settings a command line gave (`--video-decay-scale`, `--decay-floor`); none for a
    command without those flags."""
    return {name: getattr(args, name) for name in SETTINGS if hasattr(args, name)}


def calibrate(log_beta: torch.Tensor, modality: torch.Tensor | None, video_scale: float = 1.0,
              floor: float = 0.0) -> torch.Tensor:
    """`log_beta` `[B, T, H]` with text and image tokens' values capped at `-floor` and video tokens'
    values x `video_scale`; `modality` `[B, T]` `Modality` codes (None: no video token). Returns
    `log_beta` itself when both are off."""
    if floor <= 0.0 and video_scale == 1.0:
        return log_beta
    video = None if modality is None else (modality == Modality.VIDEO).to(log_beta.device)[..., None]
    if floor > 0.0:
        floored = log_beta.clamp(max=-floor)
        log_beta = floored if video is None else torch.where(video, log_beta, floored)
    if video_scale != 1.0 and video is not None:
        log_beta = torch.where(video, log_beta * video_scale, log_beta)
    return log_beta


def calibrate_forward(log_beta: torch.Tensor, plan, video_scale: float, floor: float) -> torch.Tensor:
    """`calibrate` with the modalities of `plan` (the forward's `ForwardPlan`, which lists its real
    tokens; padding columns stay text)."""
    if video_scale == 1.0 and floor <= 0.0:
        return log_beta
    modality = torch.zeros(log_beta.shape[:2], dtype=plan.token_modality.dtype, device=plan.token_modality.device)
    modality[plan.token_batch, plan.token_column] = plan.token_modality
    return calibrate(log_beta, modality, video_scale, floor)
