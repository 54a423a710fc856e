"""`TrainConfig`: every setting of a gate-training run, read from YAML and validated.

Why: a training recipe is data (`configs/train-*.yaml`) that a user copies and edits; a typo or an
impossible value must stop the run before the model loads, with one sentence naming the setting
(`ConfigError`, which the CLI prints as `dbtrimkv: error: ...`). The file is flat: one key per
setting, the same names as the fields below. Relative paths are relative to the working directory.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..modeling.gates import GATE_TYPES
from ..modeling.transformers_compat import VIDEO_LAYOUTS
from ..settings.presets import load_yaml
from .train_attention import BACKENDS
from .capacity import CAPACITY_MODES
from .distill import LOSS_KINDS

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    # model: a name as in load_model (tiny / tiny-moe / tiny-text, a directory, a hub id); a gate
    # checkpoint continues training its gates
    model: str = "tiny"
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU (the gates always train in float32)
    device: str = "auto"  # auto | cpu | cuda; under `accelerate launch` each process takes its own GPU
    seed: int = 0
    output_dir: str = "runs/gates"
    # gates (ignored when `model` already holds gates)
    gate_type: str = "rg10"
    gate_intermediate_size: int = 512
    gate_bias_init: float = 18.0
    tie_gate_layers: bool = True
    # objective: loss + capacity_weight * capacity loss
    loss: str = "fwkl_ntp"  # fwkl | fwkl_ntp (average of KL and next-token loss)
    capacity: str = "global"  # global (DBTrimKV) | head (TRIM-KV)
    memory_size: int = 512  # M: entries per (layer, KV head); the global budget is M x L x H
    capacity_weight: float = 1.0
    # train as if every sequence were this many times longer: log beta x decay_scale in the student's
    # attention and the capacity loss (`model.stretch_gate_horizon`); the saved gates are unscaled
    decay_scale: float = 1.0
    # a floor on d log beta / d gate logit, so saturated gates (log beta = 0 in float32) still learn
    saturation_grad: float = 0.0
    # data
    train_data: str | None = None  # chat JSONL; None: generate `synthetic_examples` examples
    synthetic_examples: int = 0
    max_length: int = 4096
    packing: bool = False  # text-only models
    video_fps: float = 2.0
    video_max_frames: int = 64
    # videos in the prompt as the installed transformers writes them, or "wrapped" as <= 5.24 did (the same
    # batches on every release: `transformers_compat.lay_out_videos`; the tiny-recall gate configs pin it)
    video_layout: str = "installed"
    num_workers: int = 0
    # optimisation (AdamW on the gate parameters, cosine schedule with linear warm-up)
    batch_size: int = 1  # per process
    grad_accum_steps: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    # compute
    attention: str = "auto"  # auto (flex on CUDA, plain on CPU) | plain | flex
    gradient_checkpointing: bool = False
    logits_chunk: int = 1024  # response positions per chunk of LM-head logits
    capacity_chunk: int | None = None  # query rows per chunk of S_t (None: sized automatically)
    # bookkeeping
    log_every: int = 1
    save_every: int = 0  # 0: only at the end
    export_released: bool = False  # also write config.json + trimkv_weights.pth under output_dir/released

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(TrainConfig)
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        choices = {"device": DEVICES, "gate_type": GATE_TYPES, "loss": LOSS_KINDS, "capacity": CAPACITY_MODES,
                   "attention": BACKENDS, "video_layout": VIDEO_LAYOUTS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        positive = ("gate_intermediate_size", "memory_size", "max_length", "batch_size", "grad_accum_steps",
                    "max_steps", "logits_chunk", "log_every", "video_max_frames")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("synthetic_examples", "num_workers", "warmup_steps", "save_every", "weight_decay",
                     "capacity_weight", "saturation_grad"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.lr <= 0 or self.video_fps <= 0:
            raise ConfigError("lr and video_fps must be positive")
        if self.decay_scale <= 0:
            raise ConfigError(f"decay_scale must be positive, got {self.decay_scale}")
        if self.capacity_chunk is not None and self.capacity_chunk < 1:
            raise ConfigError(f"capacity_chunk must be at least 1 (or null), got {self.capacity_chunk}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm must be positive (or null), got {self.max_grad_norm}")
        if self.train_data is None and self.synthetic_examples == 0:
            raise ConfigError("set train_data (a chat JSONL file) or synthetic_examples (> 0)")

    @classmethod
    def load(cls, name_or_path: str | Path, **overrides) -> "TrainConfig":
        """Read a YAML file (or a preset name in configs/), then apply non-None overrides."""
        try:
            data = load_yaml(name_or_path)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read training config {name_or_path}: {exc}") from None
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(data) - set(hints))
        if unknown:
            raise ConfigError(f"{name_or_path}: unknown setting(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(hints))}")
        for key, value in data.items():  # YAML 1.1 reads `1e-3` (no dot) as a string
            if isinstance(value, str) and float in (typing.get_args(hints[key]) or (hints[key],)):
                try:
                    data[key] = float(value)
                except ValueError:
                    pass
        return cls(**{**data, **{k: v for k, v in overrides.items() if v is not None}})

    def to_dict(self) -> dict:
        return asdict(self)


def _check_type(name: str, value, hint) -> None:
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return
    ok = any(
        (t is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (t is int and isinstance(value, int) and not isinstance(value, bool))
        or (t in (str, bool) and isinstance(value, t))
        for t in allowed
    )
    if not ok:
        wanted = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ConfigError(f"{name} must be {wanted}, got {value!r}")
