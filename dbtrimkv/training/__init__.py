"""Training retention gates: distillation from the full-attention model plus a capacity loss.

`train(TrainConfig.load("configs/train-tiny.yaml"))` or `dbtrimkv train --config ...`. Modules:
`attention` / `biased_attention` (the retention-biased student attention and the teacher switch),
`capacity` (+ `capacity_reference`), `distill`, `objective`, `data`, `collate`, `synthetic`,
`model`, `checkpoint`, `log`, `trainer`, `config`.
"""

from .train_attention import TRAIN_ATTENTION_NAME, enable_training_attention, teacher_attention
from .capacity import capacity_loss
from .train_config import TrainConfig
from .synthetic import write_synthetic_dataset
from .trainer import TrainResult, train

__all__ = ["TRAIN_ATTENTION_NAME", "TrainConfig", "TrainResult", "capacity_loss", "enable_training_attention",
           "teacher_attention", "train", "write_synthetic_dataset"]
