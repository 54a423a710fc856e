"""Train the tiny recall Qwen3-VL from scratch on the synthetic task (`dbtrimkv eval train-recall`).

Why: the benchmark is only meaningful with a model that answers correctly when nothing is
evicted. The recipe (sizes, task mixture, curriculum, optimiser, steps) lives in
`configs/recall-tiny.yaml`; given the same recipe and seed, the run draws the same examples and
initial weights. Every training example is a multi-question chat (several keys asked in turn),
and only the assistant answers are supervised (the digit and the `<|im_end|>` after it), so each
forward yields several answer tokens.

Copy chats: in the text-only first stage, a fraction of the batches are "repeat after me" chats
(the user writes a random string of keys and digits, the assistant repeats it; every repeated
token is supervised); later stages spend those batches on images and clips instead. Each
repeated token is the induction step the recall needs (find the earlier occurrence of the
current token, copy what followed it), and a chat gives dozens of them instead of one or two.
Measured on a bare 3-layer Qwen3 text model with key/value recalls: without copy data the recall
accuracy stayed at chance (~37%) for 1,500 steps; with half the sequences copies it reached 99%
by step 350, also for values two tokens after their key (as an image is, after `<|vision_start|>`).

Curriculum: a small model only finds the retrieval circuit on easy prompts (one or two cards,
little filler); on long prompts it sits at chance. So training moves through `stages` of growing
(cards, filler) and advances when teacher-forced accuracy on a fixed check set of the current
stage reaches `advance_at`; after the last stage it keeps training on the full range. The check
sets are deterministic, so the run (stage changes included) is reproducible on one machine.
Held-out accuracy (seeds below `TRAIN_SEED_BASE`) is measured with teacher forcing, which equals
greedy decoding of the first answer token. The vision tower is unstable at learning rates the
text model tolerates, hence one moderate rate for all parameters (see the recipe).

Continuing and resuming: a recipe with `init: DIR` starts from the weights saved in DIR (e.g. the
clip recipe `configs/recall-tiny-clips.yaml` continues the base run). With `train.checkpoint_every`
the run writes `OUTPUT/resume/` (weights, optimiser state, step, curriculum stage); `train(...,
resume=True)` continues from there. Batches are a pure function of the step, so a resumed run draws
the same examples and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from ..loading import tiny
from ..inputs.prompts import VideoOptions, build_inputs
from .recall_model import build_model, load_recipe, recipe_video, save_model
from .tasks import (
    DIGIT_HOLD, DIGITS, KEYS, TASK_KINDS, TRAIN_SEED_BASE, ImageRecallTask, RecallExample, RecallTask, VideoRecallTask, examples,
    make_example, prompt_inputs,
)

logger = logging.getLogger(__name__)

ASSISTANT_PREFIX = "<|im_start|>assistant\n"


CHECK_SEED_BASE = 500_000  # curriculum check sets: held out from training, apart from the benchmark's seeds


def sample_task(seed: int, mixture: dict[str, Any], stage: list[int]) -> RecallTask | VideoRecallTask | ImageRecallTask:
    """The task of one training batch (one task per batch keeps padding low): a clip (probability
    `video`; the digit on `video_hold` consecutive frames, default `DIGIT_HOLD`), a single image
    (`image`) or a card stream; `stage` = [max cards, max filler] of the
    curriculum, or [max cards, max filler, "text"] for card streams whose values are all text (no
    images, no video)."""
    rng = random.Random(seed)
    max_cards, max_filler, *only = stage
    text_only = only == ["text"]
    size = rng.choice(mixture["image_sizes"])
    if rng.random() < mixture["video"] and not text_only:
        # half the clips come without filler: the layout of a plain chat about a clip (CLI, demo)
        filler = 0 if rng.random() < 0.5 else rng.randint(0, max_filler)
        return VideoRecallTask(frames=_clip_frames(rng, mixture), filler=filler, image_size=size,
                               hold=mixture.get("video_hold", DIGIT_HOLD), **_clip_fps(rng, mixture))
    if rng.random() < mixture.get("image", 0.0) and not text_only:
        filler = 0 if rng.random() < 0.5 else rng.randint(0, max_filler)  # half as `dbtrimkv chat --image` sends
        return ImageRecallTask(filler=filler, image_size=size)
    cards = rng.randint(1, max_cards)
    modalities = dict(answer_modality="text", card_modalities=("text",)) if text_only else {}
    return RecallTask(num_cards=cards, filler=rng.randint(0, max_filler), image_size=size,
                      distractors=rng.randint(0, mixture["max_distractors"]), questions=mixture["questions"],
                      recalls=round(mixture.get("recalls_per_card", 0) * cards), **modalities)


def _clip_frames(rng: random.Random, mixture: dict[str, Any]) -> int:
    """Frames of a training clip in `video_frames` [low, high]: uniform, or log-uniform with
    `video_frames_scale: log` (as many 16-64 frame clips as 64-256 ones: short clips keep the digit
    detector learning, long ones make the answer a retrieval over hundreds of frames)."""
    low, high = mixture["video_frames"]
    if mixture.get("video_frames_scale", "uniform") == "log":
        return min(high, int(math.exp(rng.uniform(math.log(low), math.log(high + 1)))))
    return rng.randint(low, high)


def _clip_fps(rng: random.Random, mixture: dict[str, Any]) -> dict[str, float]:
    """`{"fps": ...}` log-uniform in `video_fps` [low, high], or `{}` (the task's 2 fps) without that
    key (no draw: recipes without it get the same tasks as before). A clip's frame rate sets its
    timestamps, the `<12.5 seconds>` text Qwen3-VL puts before every 2-frame group: a few dozen
    frames at a low rate carry the large, varied timestamps of an hour-long video, so gates trained
    on short clips also learn that those timestamps are not worth keeping."""
    if "video_fps" not in mixture:
        return {}
    low, high = mixture["video_fps"]
    return {"fps": round(math.exp(rng.uniform(math.log(low), math.log(high))), 4)}


@dataclasses.dataclass(frozen=True)
class CopyChat:
    """A "repeat after me" chat (training only): the assistant repeats the user's `text`."""

    text: str

    def training_messages(self) -> list[dict]:
        return [{"role": "user", "content": [{"type": "text", "text": self.text}]},
                {"role": "assistant", "content": [{"type": "text", "text": self.text}]}]


def copy_chat(seed: int, length: int) -> CopyChat:
    """A random string of `length` keys and digits (repeats allowed: a repeated token's successor
    differs between its occurrences, so only the current occurrence's place says what to copy)."""
    rng = random.Random(seed)
    return CopyChat("".join(rng.choice(KEYS + DIGITS) for _ in range(length)))


def sample_batch(seed: int, size: int, mixture: dict[str, Any],
                 stage: list[int]) -> list[RecallExample] | list[CopyChat]:
    """`size` examples of one sampled task, from seeds `seed .. seed + size - 1`: in a text-only stage
    copy chats with probability `mixture["copy"]`, else recall prompts of `sample_task`. Clips come
    `video_batch_size` at a time when the mixture sets it (long clips are many tokens each)."""
    rng = random.Random(seed)
    if stage[2:] == ["text"] and rng.random() < mixture.get("copy", 0.0):
        return [copy_chat(seed + i, rng.randint(*mixture["copy_length"])) for i in range(size)]
    task = sample_task(seed, mixture, stage)
    if isinstance(task, VideoRecallTask):
        size = min(size, mixture.get("video_batch_size", size))
    return [make_example(seed + i, task) for i in range(size)]


def check_set(mixture: dict[str, Any], stage: list[int], size: int) -> list[RecallExample]:
    """Fixed single-question card streams of one curriculum stage, for deciding when to advance (the
    stages grow the card streams; clips and single images do not depend on them)."""
    out = []
    cards_only = dict(mixture, video=0.0, image=0.0)
    for i in range(size):
        seed = CHECK_SEED_BASE + 1000 * stage[0] + i
        task = sample_task(seed, cards_only, stage)
        if isinstance(task, RecallTask):
            task = dataclasses.replace(task, questions=1)
        out.append(make_example(seed, task))
    return out


def reply_starts(input_ids: torch.Tensor, header_ids: list[int]) -> list[tuple[int, int]]:
    """(row, column) of the first token after every assistant header (`<|im_start|>assistant\n`)."""
    k = len(header_ids)
    windows = input_ids.unfold(1, k, 1)  # [B, T - k + 1, k]
    rows, cols = (windows == torch.tensor(header_ids)).all(-1).nonzero(as_tuple=True)
    return [(r, c + k) for r, c in zip(rows.tolist(), cols.tolist())]


def answer_positions(input_ids: torch.Tensor, header_ids: list[int], digit_ids: list[int]) -> list[tuple[int, int]]:
    """(row, column) of every answer token: the first digit after the header that opens each assistant
    turn (`<|im_start|>assistant\nK` -> the digit; answer prefixes hold no digit)."""
    out = []
    is_digit = torch.isin(input_ids, torch.tensor(digit_ids))
    for r, start in reply_starts(input_ids, header_ids):
        digits = is_digit[r, start:].nonzero()
        if len(digits) and start + int(digits[0]) + 1 < input_ids.shape[1]:
            out.append((r, start + int(digits[0])))
    return out


def recall_positions(input_ids: torch.Tensor, key_ids: list[int], digit_ids: list[int]) -> list[tuple[int, int]]:
    """(row, column) of every digit right after a key K that occurred earlier in the row: the
    recalls inside a training stream (and the answers). A card's first mention is not a target."""
    out = []
    keys, digits = set(key_ids), set(digit_ids)
    for r, row in enumerate(input_ids.tolist()):
        seen = set()
        for c in range(1, len(row)):
            if row[c - 1] not in keys:
                continue
            if row[c] in digits and row[c - 1] in seen:
                out.append((r, c))
            seen.add(row[c - 1])
    return out


def copy_positions(input_ids: torch.Tensor, header_ids: list[int], end_id: int) -> list[tuple[int, int]]:
    """(row, column) of every token the assistant writes (its `<|im_end|>` included) in each row."""
    out = []
    for r, start in reply_starts(input_ids, header_ids):
        end = input_ids[r].tolist().index(end_id, start)
        out += [(r, col) for col in range(start, end + 1)]
    return out


def collate(processor, batch: list[RecallExample] | list[CopyChat], video: VideoOptions | None = None):
    """Model inputs for the chats with their answers, and the (row, column) of every supervised token:
    for card streams each answer digit, the `<|im_end|>` that closes it (the echoed key is given,
    not learned) and the digit of every recall inside the stream; for copy chats, clips and single
    images every token of the assistant's reply. `video`: the recipe's (`recipe_video`)."""
    inputs = build_inputs(processor, [ex.training_messages() for ex in batch], add_generation_prompt=False,
                          video=video)
    tokenizer = processor.tokenizer
    header = tokenizer(ASSISTANT_PREFIX, add_special_tokens=False).input_ids
    ids = inputs["input_ids"]
    # copy chats, clips and single images: the whole reply is supervised (`video:` / `image:` are fixed)
    copies = {r for r, ex in enumerate(batch) if isinstance(ex, CopyChat) or ex.fixed_answer_prefix}
    copied = [t for t in copy_positions(ids, header, tokenizer.convert_tokens_to_ids("<|im_end|>")) if t[0] in copies]
    digit_ids = tokenizer.convert_tokens_to_ids(list(DIGITS))
    starts = [t for t in answer_positions(ids, header, digit_ids) if t[0] not in copies]
    recalls = [t for t in recall_positions(ids, tokenizer.convert_tokens_to_ids(list(KEYS)), digit_ids)
               if t[0] not in copies]
    targets = sorted(set(starts) | set(recalls)) + [(r, c + 1) for r, c in starts] + copied
    return inputs, targets


def answer_loss(model, inputs, targets: list[tuple[int, int]]) -> torch.Tensor:
    """Cross-entropy of the supervised tokens, each predicted from the position before it."""
    inputs = inputs.to(model.device)
    logits = model(**inputs).logits
    rows = torch.tensor([r for r, _ in targets], device=model.device)
    cols = torch.tensor([c for _, c in targets], device=model.device)
    return F.cross_entropy(logits[rows, cols - 1].float(), inputs["input_ids"][rows, cols])


@torch.no_grad()
def teacher_forced_accuracy(model, processor, examples: list[RecallExample], batch_size: int = 16,
                            video: VideoOptions | None = None) -> float:
    """Fraction of examples whose last answer is the argmax at the answer position (full cache)."""
    model.eval()
    correct = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        inputs = prompt_inputs(processor, chunk, video).to(model.device)
        logits = model(**inputs).logits[:, -1]
        predicted = processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        correct += sum(p == ex.answer for p, ex in zip(predicted, chunk))
    model.train()
    return correct / max(len(examples), 1)


def parameter_groups(model, opt_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The vision tower at `vision_lr` (it diverges at rates the text model needs), the rest at `lr`."""
    vision, text = [], []
    for name, parameter in model.named_parameters():
        (vision if ".visual." in f".{name}" else text).append(parameter)
    vision_lr = opt_cfg.get("vision_lr", opt_cfg["lr"])
    return [{"params": text, "peak_lr": opt_cfg["lr"]}, {"params": vision, "peak_lr": vision_lr}]


def _lr_at(step: int, steps: int, peak: float, warmup: int, decay_fraction: float, final_fraction: float) -> float:
    """Linear warm-up, constant, then a cosine decay over the last `decay_fraction` of the steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_start = steps * (1 - decay_fraction)
    if step < decay_start:
        return peak
    progress = (step - decay_start) / max(1.0, steps - decay_start)
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def heldout_sets(recipe: dict[str, Any]) -> dict[str, list[RecallExample]]:
    """The held-out examples the run reports on: the benchmark's default tasks (small seeds), plus
    the named sets of `eval.extra` (`name: {kind: video, frames: 256, ...}`)."""
    n = recipe["eval"]["examples"]
    sets = {kind: examples(kind, range(n), task(**recipe["eval"].get(kind, {}))) for kind, task in TASK_KINDS.items()}
    for name, spec in recipe["eval"].get("extra", {}).items():
        spec = dict(spec)
        kind = spec.pop("kind")
        sets[name] = examples(kind, range(n), TASK_KINDS[kind](**spec))
    return sets


def initial_model(recipe: dict[str, Any]):
    """`(model, processor)` the run starts from: the weights of `init` if the recipe names a model
    directory, else a fresh model of the recipe's sizes (deterministic by seed)."""
    if not recipe.get("init"):
        return build_model(recipe["model"], recipe["seed"])


    init = Path(recipe["init"])
    if not (init / "model.safetensors").is_file():
        raise FileNotFoundError(f"init: {init} holds no model.safetensors (train the recipe it continues first)")
    model = AutoModelForImageTextToText.from_pretrained(init, dtype=torch.float32)
    return model, tiny.build_processor()


RESUME_DIR = "resume"


def save_checkpoint(directory: Path, model, processor, optimizer, state: dict[str, Any]) -> None:
    """Weights (safetensors), optimiser state (tensors only) and the loop state; written to a
    temporary directory first and renamed, so an interruption leaves the previous checkpoint intact."""
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_model(model, processor, partial)
    torch.save(optimizer.state_dict(), partial / "optimizer.pt")
    (partial / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)


def load_checkpoint(directory: Path, model, optimizer) -> dict[str, Any]:
    """Restore weights and optimiser state saved by `save_checkpoint`; returns the loop state."""
    model.load_state_dict(load_file(directory / "model.safetensors"))
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
    return json.loads((directory / "state.json").read_text(encoding="utf-8"))


def train(recipe_path: str | Path, output: str | Path | None = None, steps: int | None = None,
          threads: int | None = 1, device: str = "cpu", resume: bool = False,
          stop_at: int | None = None) -> dict[str, float]:
    """Run the recipe; save the final model to `output` (default: the recipe's). Returns held-out accuracy.

    `resume`: continue from `OUTPUT/resume/` when it exists (written every `checkpoint_every` steps).
    `stop_at`: end this session after that step with a checkpoint (the schedule stays the recipe's),
    to split a long CPU run into sessions; returns the held-out accuracy at that point."""
    recipe = load_recipe(recipe_path)
    video = recipe_video(recipe)
    if threads:
        torch.set_num_threads(threads)
    opt_cfg, mixture, curriculum = recipe["train"], recipe["mixture"], recipe["curriculum"]
    steps = steps or opt_cfg["steps"]
    output = Path(output or recipe["output"])
    model, processor = initial_model(recipe)
    model.to(device)  # float32 everywhere: the run is small, and the recipe's rates were tuned in fp32
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, opt_cfg), betas=tuple(opt_cfg["betas"]),
                                  weight_decay=opt_cfg["weight_decay"])
    heldout = heldout_sets(recipe)
    batch_size = opt_cfg["batch_size"]
    stages = curriculum["stages"]
    state = {"step": 0, "stage": 0, "smoothed": None, "seconds": 0.0}
    checkpoint_dir = output / RESUME_DIR
    if resume and (checkpoint_dir / "state.json").is_file():
        state = load_checkpoint(checkpoint_dir, model, optimizer)
        logger.info("resumed %s at step %d (stage %d, %.0fs trained before)", checkpoint_dir, state["step"],
                    state["stage"], state["seconds"])
    stage, smoothed = state["stage"], state["smoothed"]
    checks = check_set(mixture, stages[stage], curriculum["check_examples"])
    seed0 = TRAIN_SEED_BASE + recipe["seed"] * 10_000_000
    start = time.perf_counter() - state["seconds"]
    scores: dict[str, float] = {}
    last = min(steps, stop_at) if stop_at else steps
    for step in range(state["step"], last):
        batch = sample_batch(seed0 + step * batch_size, batch_size, mixture, stages[stage])
        inputs, targets = collate(processor, batch, video)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, group["peak_lr"], opt_cfg["warmup"], opt_cfg["decay_fraction"],
                                 opt_cfg["final_lr_fraction"])
        loss = answer_loss(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg["grad_clip"])
        optimizer.step()
        value = float(loss.detach())
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        if (step + 1) % opt_cfg["log_every"] == 0:
            logger.info("step %d/%d stage %d %s loss %.3f lr %.2e %.0fs", step + 1, steps, stage, stages[stage],
                        smoothed, optimizer.param_groups[0]["lr"], time.perf_counter() - start)
        if stage + 1 < len(stages) and (step + 1) % curriculum["check_every"] == 0:
            accuracy = teacher_forced_accuracy(model, processor, checks, video=video)
            if accuracy >= curriculum["advance_at"]:
                stage += 1
                checks = check_set(mixture, stages[stage], curriculum["check_examples"])
                logger.info("step %d: stage accuracy %.2f -> stage %d %s", step + 1, accuracy, stage, stages[stage])
        if (step + 1) % opt_cfg["eval_every"] == 0 or step + 1 == steps:
            scores = {k: teacher_forced_accuracy(model, processor, v, video=video) for k, v in heldout.items()}
            logger.info("step %d held-out accuracy %s", step + 1, {k: round(v, 3) for k, v in scores.items()})
            save_model(model.eval(), processor, output)
            model.train()
        every = opt_cfg.get("checkpoint_every", 0)
        if (every and ((step + 1) % every == 0 or step + 1 == last)) or step + 1 == last < steps:
            save_checkpoint(checkpoint_dir, model, processor, optimizer,
                            {"step": step + 1, "stage": stage, "smoothed": smoothed,
                             "seconds": time.perf_counter() - start})
    if not scores:  # stopped between evaluations, or resumed at the end: report the current weights
        scores = {k: teacher_forced_accuracy(model, processor, v, video=video) for k, v in heldout.items()}
    logger.info("saved %s after %.0fs", output, time.perf_counter() - start)
    return scores
