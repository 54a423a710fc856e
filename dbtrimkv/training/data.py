"""Training data: chat JSONL -> token sequences with a response-only loss mask.

Why: gates are trained on the same chats users send, in the format `prompts.build_inputs` accepts:
one JSON object per line, `{"messages": [{"role": "user", "content": [{"type": "image", "image":
"cat.png"}, {"type": "text", "text": "..."}]}, {"role": "assistant", "content": "..."}]}`. Relative
media paths are relative to the JSONL file. The distillation loss only counts the assistant turns
(the responses): `<|im_start|>assistant\\n` ... `<|im_end|>` in the ChatML rendering every Qwen3 /
Qwen3-VL chat template produces (the closing `<|im_end|>` is part of the response, so the student
learns where answers stop).

Length: a sequence longer than `max_length` is cut at `max_length` tokens (the tail goes; a warning
names the example). A cut must not split an image or video, and something must remain to learn
from: an example whose media reach past `max_length`, or with no response token before the cut, is
replaced by the next usable example (warned once) so batches keep their shape on every process.
Media are processed lazily, when an example is drawn, not all up front.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DBTrimKVError
from ..inputs.prompts import VideoOptions, build_inputs, is_multimodal, tokenizer_of

logger = logging.getLogger(__name__)

MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
RESPONSE_HEADER = "<|im_start|>assistant\n"
RESPONSE_END = "<|im_end|>"


class UnusableExample(Exception):
    """An example that cannot be trained on within `max_length` (the message says why)."""


def read_chats(path: str | Path) -> list[list[dict]]:
    """The `messages` of every line of a JSONL file, media paths made absolute."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training data {path} does not exist")
    chats = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ConfigError(f"{path}:{number}: expected an object with a non-empty 'messages' list")
        chats.append([_resolve_media(message, path.parent) for message in messages])
    if not chats:
        raise ConfigError(f"training data {path} holds no examples")
    return chats


def _resolve_media(message, base: Path):
    """Media paths (an image, a video file, or a video given as a list of frame files) made absolute."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message

    def resolve(value):
        if isinstance(value, str):
            return value if Path(value).is_absolute() else str(base / value)
        return [resolve(v) for v in value] if isinstance(value, list) else value

    parts = [dict(part, **{k: resolve(part[k]) for k in ("image", "video") if k in part})
             if isinstance(part, dict) else part for part in message["content"]]
    return dict(message, content=parts)


def response_mask(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """True for the tokens of assistant turns (after the header, up to and including `<|im_end|>`)."""
    header = tokenizer.encode(RESPONSE_HEADER, add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids(RESPONSE_END)
    ids = input_ids.tolist()
    mask = torch.zeros(len(ids), dtype=torch.bool)
    i = 0
    while i + len(header) <= len(ids):
        if ids[i:i + len(header)] != header:
            i += 1
            continue
        j = i + len(header)
        while j < len(ids) and ids[j] != end:
            j += 1
        mask[i + len(header):min(j + 1, len(ids))] = True
        i = j + 1
    return mask


def encode_example(processor, messages, max_length: int, video: VideoOptions | None = None) -> dict:
    """Token ids, loss positions and media tensors of one chat (1-D sequence tensors)."""
    inputs = build_inputs(processor, messages, add_generation_prompt=False, video=video)
    ids = inputs["input_ids"][0]
    response = response_mask(ids, tokenizer_of(processor))
    if not response.any():
        raise UnusableExample("it has no assistant reply (<|im_start|>assistant ... <|im_end|>)")
    example = {"input_ids": ids}
    if is_multimodal(processor):
        example["mm_token_type_ids"] = inputs["mm_token_type_ids"][0]
        example.update({k: inputs[k] for k in MEDIA_KEYS if inputs.get(k) is not None})
    if len(ids) > max_length:
        media = example.get("mm_token_type_ids")
        if media is not None and media[max_length:].any():
            last = int(media.nonzero().max()) + 1
            raise UnusableExample(f"its images/videos reach token {last}, past max_length={max_length}")
        example["input_ids"] = ids[:max_length]
        if media is not None:
            example["mm_token_type_ids"] = media[:max_length]
        response = response[:max_length]
        example["truncated_from"] = len(ids)
    loss_mask = torch.zeros_like(response)
    loss_mask[:-1] = response[1:]  # position t is trained to predict token t + 1
    if not loss_mask.any():
        raise UnusableExample(f"no response token is left within max_length={max_length}")
    targets = torch.zeros_like(example["input_ids"])
    targets[:-1] = example["input_ids"][1:]
    example.update(loss_mask=loss_mask, targets=targets, positions=torch.arange(len(targets)))
    return example


class ChatDataset(Dataset):
    """Chats encoded on access; an unusable one is replaced by the next usable chat (see module doc)."""

    def __init__(self, chats: list[list[dict]], processor, max_length: int, video: VideoOptions | None = None,
                 source: str = "data"):
        self.chats, self.processor, self.max_length, self.video = chats, processor, max_length, video
        self.source = source
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.chats)

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.chats)):
            example = self._encode((index + offset) % len(self.chats))
            if example is not None:
                return example
        raise ConfigError(f"{self.source}: no example fits max_length={self.max_length} with a response left")

    def usable_examples(self) -> list[dict]:
        """Every usable example once, in file order (for packing)."""
        examples = [e for e in map(self._encode, range(len(self.chats))) if e is not None]
        if not examples:
            raise ConfigError(f"{self.source}: no example fits max_length={self.max_length} with a response left")
        return examples

    def _encode(self, i: int) -> dict | None:
        try:
            example = encode_example(self.processor, self.chats[i], self.max_length, self.video)
        except UnusableExample as exc:
            self._warn(i, f"skipped: {exc}")
            return None
        except (DBTrimKVError, ValueError) as exc:
            raise ConfigError(f"{self.source}: example {i + 1}: {exc}") from None
        length = example.pop("truncated_from", None)
        if length is not None:
            self._warn(i, f"has {length} tokens: truncated to max_length={self.max_length}")
        return example

    def _warn(self, i: int, message: str) -> None:
        if i not in self._warned:
            self._warned.add(i)
            logger.warning("%s: example %d %s", self.source, i + 1, message)
