"""Train rg10 retention gates of the recall model on recall data; install them next to the model.

Why: the learned policies (`global`, `layer`, `head`) are only as good as their gates, and the
benchmark needs gates trained on the task. This is the DBTrimKV recipe of `dbtrimkv.training`
(distillation to the full-cache model + global capacity loss, `configs/train-recall-gates.yaml`)
run on synthetic recall chats written as a chat JSONL (images as PNG files). The trained gates are
then saved with `save_gates` into the model's directory with `base_model: "."`, so
`load_model(asset_dir)` loads model and gates together.

The trainer continues from existing gates when its model directory holds some; to always start
from fresh gates, it trains on a staging directory that links only the base model's files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from ..loading.checkpoints import holds_gates, load_model, save_gates
from ..settings.config import DBTrimKVConfig
from ..errors import ConfigError
from ..training import TrainConfig, train
from .recall_model import load_recipe
from .tasks import TRAIN_SEED_BASE, make_example
from .train_model import sample_task

logger = logging.getLogger(__name__)

SHIPPED_RECIPE = "recall-tiny-clips.yaml"  # the recipe of the shipped tiny-recall model

GATE_DATA_SEED_BASE = TRAIN_SEED_BASE + 900_000_000  # apart from the base model's training seeds
BASE_FILES = ("config.json", "generation_config.json", "model.safetensors", "chat_template.jinja",
              "processor_config.json", "tokenizer.json", "tokenizer_config.json")


def _store_media(content: list[dict], directory: Path, stem: str) -> list[dict]:
    """The message parts with PIL images / video frames replaced by PNG paths written under `directory`."""
    parts = []
    for k, part in enumerate(content):
        if part["type"] == "image":
            path = directory / f"{stem}_{k}.png"
            part["image"].save(path)
            part = dict(part, image=str(path))
        elif part["type"] == "video":
            frames = []
            for f, frame in enumerate(part["video"]):
                frames.append(str(directory / f"{stem}_{k}_{f}.png"))
                frame.save(frames[-1])
            part = dict(part, video=frames)
        parts.append(part)
    return parts


def write_recall_dataset(path: str | Path, examples: int, mixture: dict, stage: list[int]) -> Path:
    """A chat JSONL of `examples` recall chats (with answers) drawn like the base model's training data
    at curriculum `stage` ([max cards, max filler]); media go to `images/` beside the file (absolute paths)."""
    path = Path(path).resolve()
    media = path.parent / "images"
    media.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(examples):
        seed = GATE_DATA_SEED_BASE + i
        task = sample_task(seed, mixture, stage)
        example = make_example(seed, task)
        messages = [dict(m, content=_store_media(m["content"], media, f"{i:05d}_{j}"))
                    for j, m in enumerate(example.training_messages())]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _stage_base_model(source: Path, directory: Path) -> Path:
    """`directory` with links to the base model files of `source` (no gate files)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in BASE_FILES:
        link = directory / name
        if link.is_symlink() or link.exists():
            link.unlink()
        if (source / name).exists():
            link.symlink_to((source / name).resolve())
    return directory


GATE_DATA = "gate_data"  # the recipe section for the gates' chats; optional, unlike a section named explicitly


def train_gates(config_path: str | Path = "train-recall-gates", examples: int = 2000,
                threads: int | None = 1, asset_dir: str | Path | None = None,
                serve_memory_size: int | None = None, recipe: str | Path = SHIPPED_RECIPE,
                gate_data: str = GATE_DATA, continue_gates: bool = False) -> Path:
    """Write the data, train the gates as the YAML says, save them into `asset_dir`; returns `asset_dir`.

    `recipe`: the model's training recipe; the chats are drawn from its mixture (updated by its
    `gate_data` section, or the section named by `gate_data`) at its last curriculum stage, and
    `asset_dir` defaults to its `output`. `continue_gates`: start from the gates `asset_dir` holds
    (a later stage, e.g. on long clips) instead of fresh ones. `serve_memory_size`: the M saved as
    the gates' default eviction (default: the training M). A chat about one image is ~50 tokens,
    where the training M (sized for 400-token card streams) leaves too little of the question: the
    shipped model is served with a larger one."""
    if threads:
        torch.set_num_threads(threads)
    config = TrainConfig.load(config_path)
    spec = load_recipe(recipe)
    if gate_data != GATE_DATA and gate_data not in spec:
        raise ConfigError(f"recipe {recipe}: no {gate_data!r} section")
    mixture = {**spec["mixture"], **(spec.get(gate_data) or {})}
    asset_dir = Path(asset_dir or spec["output"])
    if continue_gates and not holds_gates(str(asset_dir)):
        raise ConfigError(f"{asset_dir} holds no gates to continue from; train the first stage without "
                          "--continue-gates")
    output = Path(config.output_dir)
    data = write_recall_dataset(config.train_data or output / "data" / "train.jsonl",
                                examples, mixture, spec["curriculum"]["stages"][-1])
    base = asset_dir if continue_gates else _stage_base_model(asset_dir, output / "base")
    config = dataclasses.replace(config, model=str(base), train_data=str(data))
    result = train(config)
    model, _ = load_model(result.output_dir)
    eviction = DBTrimKVConfig(memory_size=serve_memory_size or config.memory_size, policy="global")
    save_gates(model, asset_dir, eviction=eviction, base_model=".")
    logger.info("installed gates from %s into %s", result.output_dir, asset_dir)
    return Path(asset_dir)
