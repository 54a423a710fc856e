"""Example images for the shipped `tiny-recall` model: what the demo offers and the README asks about.

Why: the default model is a toy trained only on the synthetic recall task, so the examples must be
inputs it was trained for and answers: a seven-segment digit image asked `which digit is in the
image?` (it answers `image:` and the digit). They are the image variant of
`dbtrimkv.recall.tasks` at fixed held-out seeds without filler text (the layout of a plain chat),
saved as PNG. (Only images: the model answers held-out clips too, 99% with a full cache, see
configs/recall-tiny-clips.yaml, but the demo offers no example clip yet.) `python -m
dbtrimkv.demos.examples` rewrites them.
"""

from __future__ import annotations

from pathlib import Path

from dbtrimkv.recall.tasks import IMAGE_QUESTION, ImageRecallTask, image_example

EXAMPLE_DIR = Path(__file__).parent / "examples"
IMAGE_SEEDS = (911, 912, 913)
IMAGE_TASK = ImageRecallTask(filler=0)


def example_images() -> list[tuple[Path, str]]:
    """(PNG path, gold answer) of every example image."""
    return [(EXAMPLE_DIR / f"digit-{seed}.png", image_example(seed, IMAGE_TASK).answer) for seed in IMAGE_SEEDS]


def example_rows() -> list[list]:
    """Rows for the demo's examples: (question, image path, video path)."""
    return [[IMAGE_QUESTION, str(path), None] for path, _ in example_images()]


def write_examples(directory: Path = EXAMPLE_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in IMAGE_SEEDS:
        paths.append(directory / f"digit-{seed}.png")
        image_example(seed, IMAGE_TASK).messages[0]["content"][0]["image"].save(paths[-1])
    return paths


if __name__ == "__main__":
    for path in write_examples():
        print(path)
