"""Synthetic multimodal recall: long prompts whose one-character answer is known.

Why: no real checkpoint can be downloaded here, so eviction quality has to be measured on a task
where we know which few tokens matter. A prompt is a stream of *cards* (an upper-case key `K`
directly followed by its value): the value is either a digit drawn as a seven-segment glyph in an
image, or a digit written as text. Cards are separated by lower-case filler text and distractor
images (filled shapes, never digits). The prompt ends with a question (`which digit is on card`)
that the assistant's answer starts with the key `K`; the token after it, the card's digit, is the
answer. Everything else in the prompt is noise, so a cache that evicts the needle card's key or
value loses the answer.

The video variant is one clip between filler text: every frame shows a distractor shape except
`DIGIT_HOLD` (3) consecutive frames at a random place, which show the digit to report (the same
still image, as a video holds a caption on screen: 1.5 s at 2 fps). Why three frames and not one:
Qwen3-VL embeds a video in groups of two consecutive frames (temporal patch size 2) and at 32 px
a group is one vision token, so a digit on one frame only is always fused into one token with a
distractor frame (measured on the first shipped model: 50% of 8-frame clips answered with the
digit on one frame, 89% with it on an aligned pair, without any training). Three consecutive
frames always contain one whole group whatever their phase, so the digit always has a token of
its own, as a single image has; a real video never shows content for exactly one sampled frame.
The long-video benchmark (`dbtrimkv.eval.long_video`) uses the same definition. The image variant is one digit image and its question: the
plain "ask about an image" chat a user of the shipped toy model can type.

Everything is a pure function of the seed (`random.Random(seed)`, shapes drawn with PIL), so a
seed names an example on every machine. Training uses seeds from `TRAIN_SEED_BASE` upwards; the
evaluation uses small seeds, so held-out examples are never trained on.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from ..inputs.prompts import VideoOptions, build_inputs

KEYS = string.ascii_uppercase
DIGITS = string.digits
CARD_MODALITIES = ("image", "text")  # where a card keeps its value (not the token modality enum)
TRAIN_SEED_BASE = 1_000_000
# the answer prefixes of the clip and single-image variants: fixed, so a model learns to write them
ANSWER_PREFIXES = {"video": "video:", "image": "image:"}

DIGIT_HOLD = 3  # consecutive frames showing the digit in a clip (see the module docstring)

# Seven-segment digits: a top, b top-right, c bottom-right, d bottom, e bottom-left, f top-left, g middle.
SEGMENTS = {"0": "abcdef", "1": "bc", "2": "abdeg", "3": "abcdg", "4": "bcfg", "5": "acdfg", "6": "acdefg",
            "7": "abc", "8": "abcdefg", "9": "abcdfg"}
SHAPES = ("circle", "triangle", "diamond", "cross")


@dataclass(frozen=True)
class RecallTask:
    """Parameters of the card-stream task.

    `answer_modality`: where the needle card keeps its value (`image`, `text`, or `any` = random);
    the other cards draw theirs at random. `needle`: relative place of the queried card in the
    stream (0 = first card, 1 = last; None = uniform). `filler`: characters of filler text between
    two cards; `distractors`: distractor images in each gap; `card_modalities`: what the other
    cards draw their value's modality from. `recalls` > 0 (training) mentions earlier cards again
    inside the stream, `K` and the digit as text, each a recall to supervise. `questions` > 1 makes a multi-turn
    chat (a question per turn, the earlier ones answered, about any card), used for training.
    """

    num_cards: int = 8
    filler: int = 48
    image_size: int = 32
    answer_modality: str = "any"
    needle: float | None = None
    distractors: int = 1
    questions: int = 1
    card_modalities: tuple[str, ...] = CARD_MODALITIES
    recalls: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_cards <= len(KEYS):
            raise ValueError(f"num_cards must be in [1, {len(KEYS)}], got {self.num_cards}")
        if self.answer_modality not in (*CARD_MODALITIES, "any"):
            raise ValueError(f"answer_modality must be image, text or any, got {self.answer_modality!r}")
        if self.needle is not None and not 0.0 <= self.needle <= 1.0:
            raise ValueError(f"needle must be in [0, 1] or None, got {self.needle}")
        if not self.card_modalities or not set(self.card_modalities) <= set(CARD_MODALITIES):
            raise ValueError(f"card_modalities must be a non-empty subset of {CARD_MODALITIES}, got {self.card_modalities}")
        if self.recalls < 0:
            raise ValueError(f"recalls must be >= 0, got {self.recalls}")
        if self.questions < 1:
            raise ValueError(f"questions must be at least 1, got {self.questions}")
        if self.image_size < 32 or self.filler < 0 or self.distractors < 0:
            raise ValueError("image_size must be >= 32, filler and distractors >= 0")


@dataclass(frozen=True)
class VideoRecallTask:
    """Parameters of the video variant: `frames` frames, of which `hold` consecutive ones starting at
    relative place `needle` (of the possible starts; None = uniform) show the digit."""

    frames: int = 16
    filler: int = 48
    image_size: int = 32
    needle: float | None = None
    fps: float = 2.0
    hold: int = DIGIT_HOLD

    def __post_init__(self) -> None:
        if self.frames < 2 or self.image_size < 32 or self.filler < 0:
            raise ValueError("frames must be >= 2, image_size >= 32, filler >= 0")
        if not 1 <= self.hold <= self.frames:
            raise ValueError(f"hold must be in [1, frames = {self.frames}], got {self.hold}")
        if self.needle is not None and not 0.0 <= self.needle <= 1.0:
            raise ValueError(f"needle must be in [0, 1] or None, got {self.needle}")


@dataclass(frozen=True)
class ImageRecallTask:
    """Parameters of the image variant: one `image_size` digit image, `filler` characters around it."""

    filler: int = 0
    image_size: int = 32

    def __post_init__(self) -> None:
        if self.image_size < 32 or self.filler < 0:
            raise ValueError("image_size must be >= 32, filler >= 0")


@dataclass
class Card:
    """One key/value binding. `image` is the seven-segment glyph (image cards) or None (text cards);
    `box` is where the glyph was drawn (x0, y0, x1, y1), so tests can read the digit back. In the
    video variant the clip is the one card and `frame` the index of its first digit frame."""

    key: str
    value: str
    modality: str
    image: Image.Image | None = None
    box: tuple[int, int, int, int] | None = None
    frame: int | None = None


@dataclass
class RecallExample:
    """A generated prompt. `messages` end with the assistant's answer prefix (`K` for card K) after the
    last question, to be continued with the answer (`prompt_inputs`); `answers` holds the gold answer
    of every question, `answer` the last one (the one to evaluate)."""

    seed: int
    messages: list[dict]
    answers: list[str]
    cards: list[Card] = field(default_factory=list)
    queried: list[int] = field(default_factory=list)  # card index of each question

    @property
    def answer(self) -> str:
        return self.answers[-1]

    @property
    def answer_modality(self) -> str:
        """Where the last answer sits: image, text or video."""
        return self.cards[self.queried[-1]].modality

    @property
    def fixed_answer_prefix(self) -> bool:
        """Whether the answer prefix is fixed (`video:`, `image:`) rather than the queried card's key."""
        return self.cards[self.queried[-1]].key in ANSWER_PREFIXES

    def training_messages(self) -> list[dict]:
        """The chat with the last assistant turn completed by its answer."""
        *head, last = self.messages
        return [*head, {"role": "assistant", "content": [_text(last["content"][0]["text"] + self.answer)]}]


def answer_prefix(key: str) -> str:
    """How the assistant starts its answer about `key`: the answer is the single token that follows.
    Echoing the key makes the answer a copy of what followed `K` on the card (an induction step),
    the same step as every recall inside a training stream. No separator between key and value: a
    `K:` would make the lookup match two tokens instead of one, a circuit small models find far
    later (measured: no binding in 3,900 CPU steps with `K:`)."""
    return key


def prompt_inputs(processor, examples: list["RecallExample"], video: VideoOptions | None = None):
    """Processor inputs of the prompts (left-padded batch), ending with the answer prefix (`video`: how
    videos are laid out, e.g. a training recipe's `video_layout`)."""
    return build_inputs(processor, [ex.messages for ex in examples], add_generation_prompt=False,
                        continue_final_message=True, video=video)


# --- drawing --------------------------------------------------------------------------------------
def _colors(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A light background and a dark foreground colour: always the same contrast sign, so a glyph's
    segments are visible to a linear patch embedding whatever the colours."""
    bg = tuple(rng.randrange(150, 256) for _ in range(3))
    fg = tuple(rng.randrange(0, 100) for _ in range(3))
    return bg, fg


def segment_rects(box: tuple[int, int, int, int], thickness: int) -> dict[str, tuple[int, int, int, int]]:
    """Rectangles of the seven segments of a digit drawn in `box`."""
    x0, y0, x1, y1 = box
    ym = (y0 + y1) // 2
    t = thickness
    return {
        "a": (x0, y0, x1, y0 + t - 1), "g": (x0, ym - t // 2, x1, ym - t // 2 + t - 1), "d": (x0, y1 - t + 1, x1, y1),
        "f": (x0, y0, x0 + t - 1, ym), "b": (x1 - t + 1, y0, x1, ym),
        "e": (x0, ym, x0 + t - 1, y1), "c": (x1 - t + 1, ym, x1, y1),
    }


def draw_digit(digit: str, size: int, rng: random.Random) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A `size`x`size` image of a seven-segment `digit` at a jittered place; returns (image, box)."""
    bg, fg = _colors(rng)
    image = Image.new("RGB", (size, size), bg)
    width, height = size * rng.randint(40, 55) // 100, size * rng.randint(60, 75) // 100
    x0 = rng.randint(size // 8, size - size // 8 - width)
    y0 = rng.randint(size // 8, size - size // 8 - height)
    box = (x0, y0, x0 + width, y0 + height)
    draw = ImageDraw.Draw(image)
    rects = segment_rects(box, thickness=max(2, size // 10))
    for name in SEGMENTS[digit]:
        draw.rectangle(rects[name], fill=fg)
    return image, box


def draw_shape(size: int, rng: random.Random) -> Image.Image:
    """A distractor: a filled circle, triangle, diamond or diagonal cross (nothing like a digit)."""
    bg, fg = _colors(rng)
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    r = size * rng.randint(25, 40) // 100
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    shape = rng.choice(SHAPES)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fg)
    else:
        width = max(2, size // 10)
        draw.line((cx - r, cy - r, cx + r, cy + r), fill=fg, width=width)
        draw.line((cx - r, cy + r, cx + r, cy - r), fill=fg, width=width)
    return image


def filler_text(n: int, rng: random.Random) -> str:
    """`n` characters of lower-case pseudo-words (no keys, no digits: nothing to confuse with a card)."""
    words, length = [], 0
    while length < n:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7)))
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:n]


# --- prompts --------------------------------------------------------------------------------------
def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _image(image: Image.Image) -> dict:
    return {"type": "image", "image": image}


def _gap(task: RecallTask, rng: random.Random) -> list[dict]:
    """Filler text of `task.filler` characters with `task.distractors` distractor images inside."""
    text = filler_text(task.filler, rng)
    cuts = sorted(rng.randint(0, len(text)) for _ in range(task.distractors))
    parts, last = [], 0
    for cut in cuts:
        parts += [_text(" " + text[last:cut] + " "), _image(draw_shape(task.image_size, rng))]
        last = cut
    parts.append(_text(" " + text[last:] + " "))
    return parts


def _make_card(key: str, modality: str, task: RecallTask, rng: random.Random) -> Card:
    value = rng.choice(DIGITS)
    if modality == "text":
        return Card(key, value, modality)
    image, box = draw_digit(value, task.image_size, rng)
    return Card(key, value, modality, image, box)


QUESTION = "\nwhich digit is on card"


def question_text(key: str) -> str:
    """The user's question: it does not name the key, the assistant's answer prefix does (see
    `answer_prefix`): a key written in the question too would be a second `K` for the lookup to
    match, one followed by no value."""
    return QUESTION


def recall_example(seed: int, task: RecallTask | None = None) -> RecallExample:
    """The card-stream prompt of `seed` (see the module docstring)."""
    task = task or RecallTask()
    rng = random.Random(seed)
    keys = rng.sample(KEYS, task.num_cards)
    last = task.num_cards - 1
    needle = rng.randint(0, last) if task.needle is None else round(task.needle * last)
    needle_modality = rng.choice(CARD_MODALITIES) if task.answer_modality == "any" else task.answer_modality
    cards = [_make_card(k, needle_modality if i == needle else rng.choice(task.card_modalities), task, rng)
             for i, k in enumerate(keys)]
    gaps = [_gap(task, rng)]
    for _ in cards:
        gaps.append(_gap(task, rng))
    # earlier questions ask about any card, repeats allowed: asking each card once would let the last
    # answers follow by elimination instead of by recall
    queried = [rng.randrange(task.num_cards) for _ in range(task.questions - 1)] + [needle]
    for _ in range(task.recalls):  # card j mentioned again at the end of a later gap
        j = rng.randrange(task.num_cards)
        gaps[rng.randint(j + 1, task.num_cards)].append(_text(cards[j].key + cards[j].value + " "))
    content = list(gaps[0])
    for card, gap in zip(cards, gaps[1:]):
        content.append(_text(card.key))
        content.append(_image(card.image) if card.image is not None else _text(card.value))
        content += gap
    messages = [{"role": "user", "content": [*content, _text(question_text(cards[queried[0]].key))]}]
    for previous, index in zip(queried, queried[1:]):
        card = cards[previous]
        messages.append({"role": "assistant", "content": [_text(answer_prefix(card.key) + card.value)]})
        messages.append({"role": "user", "content": [_text(question_text(cards[index].key))]})
    messages.append({"role": "assistant", "content": [_text(answer_prefix(cards[needle].key))]})
    return RecallExample(seed, messages, [cards[i].value for i in queried], cards, queried)


VIDEO_QUESTION = "which digit is in the video?"


def video_example(seed: int, task: VideoRecallTask | None = None) -> RecallExample:
    """A clip of distractor frames with the digit held for `task.hold` consecutive frames, between
    filler text; answer: the digit. The answer prefix `video:` is fixed, so a model can learn to write it: a plain chat about a clip
    (the CLI, the demo) gets `video:` and the digit."""
    task = task or VideoRecallTask()
    rng = random.Random(seed)
    last = task.frames - task.hold
    needle = rng.randint(0, last) if task.needle is None else round(task.needle * last)
    digit = rng.choice(DIGITS)
    frames, box = [], None
    for i in range(task.frames):
        if i == needle:
            frame, box = draw_digit(digit, task.image_size, rng)
        elif needle < i < needle + task.hold:
            frame = frames[-1]  # the same still image: the digit stays on screen
        else:
            frame = draw_shape(task.image_size, rng)
        frames.append(frame)
    # without filler the turn is exactly what `dbtrimkv chat QUESTION --video CLIP` sends: clip, question
    before, after = filler_text(task.filler, rng), filler_text(task.filler, rng)
    content = [
        *([_text(before + " ")] if before else []),
        {"type": "video", "video": frames, "fps": task.fps},
        *([_text(" " + after + "\n")] if after else []),
        _text(VIDEO_QUESTION),
    ]
    card = Card("video", digit, "video", frames[needle], box, frame=needle)
    messages = [{"role": "user", "content": content},
                {"role": "assistant", "content": [_text(ANSWER_PREFIXES["video"])]}]
    return RecallExample(seed, messages, [digit], [card], [0])


IMAGE_QUESTION = "which digit is in the image?"


def image_example(seed: int, task: ImageRecallTask | None = None) -> RecallExample:
    """One digit image (between filler text if `task.filler`) and its question; answer: the digit.
    Without filler the turn is what `dbtrimkv chat QUESTION --image PNG` sends."""
    task = task or ImageRecallTask()
    rng = random.Random(seed)
    digit = rng.choice(DIGITS)
    image, box = draw_digit(digit, task.image_size, rng)
    before, after = filler_text(task.filler, rng), filler_text(task.filler, rng)
    content = [*([_text(before + " ")] if before else []), _image(image),
               *([_text(" " + after + "\n")] if after else []), _text(IMAGE_QUESTION)]
    messages = [{"role": "user", "content": content},
                {"role": "assistant", "content": [_text(ANSWER_PREFIXES["image"])]}]
    return RecallExample(seed, messages, [digit], [Card("image", digit, "image", image, box)], [0])


TASK_KINDS = {"cards": RecallTask, "video": VideoRecallTask, "image": ImageRecallTask}  # the variants by name


def make_example(seed: int, task: RecallTask | VideoRecallTask | ImageRecallTask) -> RecallExample:
    """The example of `seed` for a task of any variant."""
    make = {RecallTask: recall_example, VideoRecallTask: video_example, ImageRecallTask: image_example}
    return make[type(task)](seed, task)


def examples(kind: str, seeds, task=None) -> list[RecallExample]:
    """Examples of `kind` (a `TASK_KINDS` name) for the given seeds (default task parameters if no `task`)."""
    task = task or TASK_KINDS[kind]()
    return [make_example(seed, task) for seed in seeds]
