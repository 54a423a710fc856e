"""Training settings: the shipped presets load, YAML quirks are handled, overrides apply."""

from __future__ import annotations

import pytest

from dbtrimkv.errors import ConfigError
from dbtrimkv.training.train_config import TrainConfig


def test_shipped_presets_load():
    tiny = TrainConfig.load("configs/train-tiny.yaml")
    assert (tiny.model, tiny.memory_size, tiny.capacity, tiny.synthetic_examples) == ("tiny", 8, "global", 32)
    big = TrainConfig.load("train-qwen3-vl-4b")  # by preset name
    assert (big.memory_size, big.gate_type, big.capacity, big.attention, big.gradient_checkpointing) == (
        512, "rg10", "global", "flex", True)


def test_gate_stage_3_is_stage_2_longer_at_half_the_learning_rate():
    import dataclasses

    stage2, stage3 = TrainConfig.load("train-recall-gates-long"), TrainConfig.load("train-recall-gates-stage3")
    changed = {f.name for f in dataclasses.fields(TrainConfig) if getattr(stage2, f.name) != getattr(stage3, f.name)}
    assert changed == {"max_steps", "lr", "output_dir", "train_data"}
    assert (stage2.max_steps, stage3.max_steps, stage3.lr) == (60, 200, pytest.approx(stage2.lr / 2))


def test_exponent_floats_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("synthetic_examples: 2\nlr: 3e-4\nmax_grad_norm: null\n")
    config = TrainConfig.load(path, max_steps=7, output_dir=None)
    assert config.lr == pytest.approx(3e-4) and config.max_grad_norm is None
    assert config.max_steps == 7 and config.output_dir == "runs/gates"  # None overrides change nothing


@pytest.mark.parametrize("text, message", [
    ("synthetic_examples: 2\nlr: fast\n", "lr must be float"),
    ("synthetic_examples: 2\npacking: yes please\n", "packing must be bool"),
    ("synthetic_examples: 2\nmemory_size: 0\n", "memory_size must be at least 1"),
    ("- a list\n", "expected a mapping"),
    ("seed: 1\n", "set train_data"),
    ("synthetic_examples: 2\ndecay_scale: 0\n", "decay_scale must be positive"),
    ("synthetic_examples: 2\nsaturation_grad: -0.1\n", "saturation_grad must not be negative"),
])
def test_bad_values(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        TrainConfig.load(path)


def test_gate_horizon_experiment_is_stage_3_with_the_two_long_sequence_settings():
    import dataclasses

    stage3, horizon = TrainConfig.load("train-recall-gates-stage3"), TrainConfig.load("train-recall-gates-horizon")
    changed = {f.name for f in dataclasses.fields(TrainConfig) if getattr(stage3, f.name) != getattr(horizon, f.name)}
    assert changed == {"max_steps", "output_dir", "train_data", "decay_scale", "saturation_grad"}
    assert (horizon.max_steps, horizon.decay_scale, horizon.saturation_grad) == (60, 2.0, 0.01)


def test_stage_4_experiment_is_stage_3_shorter_at_half_its_learning_rate():
    import dataclasses

    stage3, stage4 = TrainConfig.load("train-recall-gates-stage3"), TrainConfig.load("train-recall-gates-stage4")
    changed = {f.name for f in dataclasses.fields(TrainConfig) if getattr(stage3, f.name) != getattr(stage4, f.name)}
    assert changed == {"max_steps", "lr", "output_dir", "train_data", "video_layout"}
    assert (stage4.max_steps, stage4.lr, stage4.video_layout) == (40, 0.00075, "installed")  # 5.25's, as it ran
