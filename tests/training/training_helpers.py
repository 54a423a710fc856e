"""Helpers shared by the gate-training tests."""

from __future__ import annotations

from dbtrimkv.training.train_config import TrainConfig
from dbtrimkv.training.model import load_for_training, prepare_for_gate_training


def tiny_config(**overrides) -> TrainConfig:
    """`configs/train-tiny.yaml` with overrides (the recipe the docs and the CLI use)."""
    return TrainConfig.load("train-tiny", **overrides)


def gated_model(variant: str = "tiny", gradient_checkpointing: bool = False, seed: int = 0):
    """`(model, processor)`: a tiny model with fresh gates, prepared for gate training (plain attention)."""
    model, processor, _ = load_for_training(tiny_config(model=variant, seed=seed), "cpu")
    prepare_for_gate_training(model, "plain", gradient_checkpointing)
    return model, processor
