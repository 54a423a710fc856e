"""`dbtrimkv train`: train retention gates by distillation + capacity loss (see dbtrimkv.training)."""

from __future__ import annotations

from ..reporting.output_paths import check_writable_dir
from .lazy import lazy

training = lazy("dbtrimkv.training")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train retention gates (distillation + capacity loss)",
        description="Train the retention gates of a frozen model: forward KL to the same model with full "
                    "attention (plus next-token loss) + a capacity loss that keeps the retained mass under "
                    "memory_size. Settings come from a YAML file (see configs/train-tiny.yaml); several GPUs: "
                    "accelerate launch -m dbtrimkv.cli train --config ...")
    p.add_argument("--config", required=True, metavar="YAML",
                   help="training settings: a YAML file or a preset name in configs/ (e.g. train-tiny)")
    p.add_argument("--output", default=None, metavar="DIR", help="output directory (overrides output_dir)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides max_steps)")
    p.add_argument("--model", default=None, help="model to train gates for (overrides model)")
    p.add_argument("--train-data", default=None, metavar="JSONL", help="chat JSONL (overrides train_data)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint directory, or (no value) the latest one in the output directory")
    p.set_defaults(func=run)


def run(args) -> int:
    config = training.TrainConfig.load(args.config, output_dir=args.output, max_steps=args.max_steps, model=args.model,
                              train_data=args.train_data)
    check_writable_dir(config.output_dir, "--output" if args.output is not None else f"output_dir of {args.config}")
    training.train(config, resume=args.resume)
    return 0
