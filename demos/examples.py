"""Example inputs for the shipped `tiny-recall` model: what the demo offers and the README asks about.

Why: the default model is a toy trained only on the synthetic recall task, so the examples must be
inputs it was trained for: a seven-segment digit image asked `which digit is in the image?`
(answer `image:` and the digit), and a short clip of shapes with one digit frame asked `which
digit is in the video?` (answer `video:` and the digit). They are the image and video variants of
`dbtrimkv.eval.synthetic` at fixed held-out seeds without filler text (the layout of a plain chat),
saved as PNG and mp4. `python -m dbtrimkv.demos.examples` rewrites them.
"""

from __future__ import annotations

from pathlib import Path

from dbtrimkv.eval.synthetic import (
    IMAGE_QUESTION, VIDEO_QUESTION, ImageRecallTask, VideoRecallTask, image_example, video_example,
)
from dbtrimkv.media import write_video

EXAMPLE_DIR = Path(__file__).parent / "examples"
IMAGE_SEEDS = (911, 912, 913)
VIDEO_SEEDS = (901, 902, 903)
IMAGE_TASK = ImageRecallTask(filler=0)
VIDEO_TASK = VideoRecallTask(frames=8, filler=0)


def example_images() -> list[tuple[Path, str]]:
    """(PNG path, gold answer) of every example image."""
    return [(EXAMPLE_DIR / f"digit-{seed}.png", image_example(seed, IMAGE_TASK).answer) for seed in IMAGE_SEEDS]


def example_clips() -> list[tuple[Path, str]]:
    """(mp4 path, gold answer) of every example clip."""
    return [(EXAMPLE_DIR / f"clip-{seed}.mp4", video_example(seed, VIDEO_TASK).answer) for seed in VIDEO_SEEDS]


def example_rows() -> list[list]:
    """Rows for the demo's examples: (question, image path, video path)."""
    return ([[IMAGE_QUESTION, str(path), None] for path, _ in example_images()]
            + [[VIDEO_QUESTION, None, str(path)] for path, _ in example_clips()])


def write_examples(directory: Path = EXAMPLE_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in IMAGE_SEEDS:
        image = image_example(seed, IMAGE_TASK).messages[0]["content"][0]["image"]
        image.save(directory / f"digit-{seed}.png")
        paths.append(directory / f"digit-{seed}.png")
    for seed in VIDEO_SEEDS:
        frames = video_example(seed, VIDEO_TASK).messages[0]["content"][0]["video"]
        paths.append(write_video(frames, directory / f"clip-{seed}.mp4", fps=VIDEO_TASK.fps))
    return paths


if __name__ == "__main__":
    for path in write_examples():
        print(path)
