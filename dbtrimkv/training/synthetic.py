"""A small deterministic chat dataset with images it draws itself, for tests and the tiny recipe.

Why: the tiny training run (tests, docs, `configs/train-tiny.yaml`) must work offline and give the
same bytes every time. Each example asks about a PNG with one coloured shape on a random
background; the answer names the colour, the shape and the side. Some examples have a second
turn. With `images=False` the chats are text-only (for text models and packing).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")
SIDES = ("left", "right")


def draw_shape(rng: np.random.Generator, colour: str, shape: str, side: str, size: int = 64) -> Image.Image:
    background = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(background)
    half = size // 2
    x0 = int(rng.integers(2, half - 20)) + (half if side == "right" else 0)
    y0 = int(rng.integers(2, size - 22))
    box = (x0, y0, x0 + 18, y0 + 18)
    draw = ImageDraw.Draw(image)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    return image


def write_synthetic_dataset(directory: str | Path, num_examples: int = 32, seed: int = 0,
                            images: bool = True) -> Path:
    """Write `train.jsonl` (and `images/*.png`) under `directory`; returns the JSONL path."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for n in range(num_examples):
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape, side = SHAPES[int(rng.integers(2))], SIDES[int(rng.integers(2))]
        answer = f"A {colour} {shape}."
        if images:
            name = f"images/{n:04d}.png"
            draw_shape(rng, colour, shape, side).save(directory / name)
            question = [{"type": "image", "image": name}, {"type": "text", "text": "What is it?"}]
        else:
            question = f"{colour} {shape}, {side}?"
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.5:
            messages += [{"role": "user", "content": "Which side?"},
                         {"role": "assistant", "content": f"The {side}."}]
        lines.append(json.dumps({"messages": messages}))
    path = directory / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
