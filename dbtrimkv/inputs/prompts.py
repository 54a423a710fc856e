"""Turn chat messages with images and videos into model inputs.

Why: every entry point (CLI, pipeline, demo, video QA, training data) speaks the same chat format,
`[{"role": "user", "content": [{"type": "image", "image": ...}, {"type": "text", "text": ...}]}]`,
where an image is a path, a PIL image or an array and a video is a path, a list of frames or a
`media.Video`. This module loads the media (clear errors for bad files), renders the chat
template, and calls the processor with decoded frames and their timing, so the processor never
tries to read files itself. A batch of conversations is left-padded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

from ..errors import MediaError, PromptError
from ..modeling.transformers_compat import lay_out_videos
from .media import Video, frames_to_video, load_image, load_video
from .modality import MODALITY_NAMES
from .text_files import check_unicode


@dataclass
class VideoOptions:
    """How video files are sampled before they reach the processor, and how videos are laid out in the
    prompt (`layout`: "installed", the installed transformers' own; "wrapped", transformers <= 5.24's,
    what training recipes pin: `transformers_compat.lay_out_videos`)."""

    fps: float = 2.0
    max_frames: int | None = 64
    layout: str = "installed"


ROLES = ("system", "user", "assistant")  # what the chat template renders as turns (the server takes the same)


def normalize_messages(messages) -> list[dict]:
    """Accept a plain string or a chat list; return a chat list with list-of-parts contents.

    A content may be a string or a list of parts; a part may be a bare string (text) or a dict with
    `type` text / image / video. Anything else is a `PromptError`."""
    if isinstance(messages, str):
        return [{"role": "user", "content": [{"type": "text", "text": messages}]}]
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise PromptError(f"messages must be a string or a list of {{'role': ..., 'content': ...}} dicts, "
                          f"got {_describe(messages)}")
    if not messages:
        raise PromptError("a chat needs at least one message")
    out = []
    for message in messages:
        if "role" not in message or "content" not in message:
            raise PromptError(f"each message needs 'role' and 'content', got keys {sorted(map(str, message))}")
        if message["role"] not in ROLES:
            raise PromptError(f"a message role must be one of {', '.join(ROLES)}, got {_describe(message['role'])}")
        content = message["content"]
        if isinstance(content, str):
            content = [content]
        if not isinstance(content, (list, tuple)):
            raise PromptError(f"message content must be a string or a list of parts, got {_describe(content)}")
        out.append({"role": message["role"], "content": [_part(p) for p in content]})
    return out


def _part(part) -> dict:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        raise PromptError(f"a message part must be a string or a dict, got {_describe(part)}")
    kind = part.get("type") or next((k for k in MODALITY_NAMES if k in part), None)
    if kind not in MODALITY_NAMES:
        raise PromptError(f"unsupported message part {_describe(part)}: type must be text, image or video")
    if kind == "text" and not isinstance(part.get("text"), str):
        raise PromptError(f"a text part needs a string 'text', got {_describe(part.get('text'))}")
    return dict(part, type=kind)


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def escape_special_tokens(chat: list[dict], tokenizer) -> list[dict]:
    """The chat with the tokenizer's added-token strings (`<|image_pad|>`, `<|im_end|>`, ...) in text
    parts broken by a zero-width space, so user text is read as plain text: it cannot open a turn,
    claim an image, or end the prompt (what chat UIs do with such text). Text that is not valid
    Unicode (a lone surrogate) is a PromptError: the tokenizer cannot encode it."""
    for message in chat:
        for part in message["content"]:
            if part["type"] == "text":
                check_unicode(part["text"], "the prompt", PromptError)
    pattern = _special_pattern(tokenizer)
    if pattern is None:
        return chat
    escape = lambda match: match.group(0)[0] + ZERO_WIDTH_SPACE + match.group(0)[1:]  # noqa: E731
    return [{**m, "content": [dict(p, text=pattern.sub(escape, p["text"])) if p["type"] == "text" else p
                              for p in m["content"]]} for m in chat]


ZERO_WIDTH_SPACE = "\u200b"


def _special_pattern(tokenizer):
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    strings = sorted({getattr(t, "content", str(t)) for t in decoder.values()} - {""}, key=len, reverse=True)
    strings = [s for s in strings if len(s) > 1]
    return re.compile("|".join(map(re.escape, strings))) if strings else None


def _load_media(messages, video: VideoOptions, processor=None, notes: list | None = None):
    images, videos = [], []
    frame_size = video_frame_size(processor)
    for message in messages:
        for part in message["content"]:
            if part["type"] == "image":
                images.append(load_image(part.get("image", part.get("path"))))
            elif part["type"] == "video":
                videos.append(_as_video(part, video, frame_size))
                if notes is not None and videos[-1].sampling:
                    notes.append(videos[-1].sampling)
    return images, videos


def _as_video(part: dict, options: VideoOptions, frame_size=None) -> Video:
    value = part.get("video", part.get("path"))
    fps, max_frames = part.get("fps", options.fps), part.get("max_frames", options.max_frames)
    if isinstance(value, Video):
        return value
    if isinstance(value, (list, tuple)):
        return frames_to_video(list(value), fps=fps, max_frames=max_frames)
    if value is None:
        raise MediaError("video part has no 'video' value")
    return load_video(value, fps=fps, max_frames=max_frames, frame_size=frame_size)


def _check_continuation(chats: list[list[dict]], continue_final_message) -> None:
    """`continue_final_message` must be a bool; when set, every chat must end with an assistant message whose
    last part is text (the start of the answer the model continues), as the chat template needs."""
    if not isinstance(continue_final_message, bool):
        raise PromptError(f"continue_final_message must be True or False, got {_describe(continue_final_message)}")
    if continue_final_message and any(chat[-1]["role"] != "assistant" or not chat[-1]["content"]
                                      or chat[-1]["content"][-1]["type"] != "text" for chat in chats):
        raise PromptError("continue_final_message needs every chat to end with an assistant message whose last "
                          "part is text: the start of the answer to continue")


def video_frame_size(processor):
    """`(num_frames, height, width) -> (height, width)`: the size Qwen3-VL's video processor would resize
    frames to, so videos are downscaled to it while they are decoded (None for other processors)."""
    vp = getattr(processor, "video_processor", None)
    size = getattr(vp, "size", None)
    longest = getattr(size, "longest_edge", None) or (size.get("longest_edge") if isinstance(size, dict) else None)
    shortest = getattr(size, "shortest_edge", None) or (size.get("shortest_edge") if isinstance(size, dict) else None)
    if not (longest and shortest and getattr(vp, "patch_size", None) and getattr(vp, "merge_size", None)):
        return None

    factor, temporal = vp.patch_size * vp.merge_size, getattr(vp, "temporal_patch_size", 2) or 2

    def frame_size(num_frames: int, height: int, width: int) -> tuple[int, int]:
        num_frames = max(num_frames, temporal)
        max_pixels = longest
        if getattr(vp, "cap_pixels_per_frame", False) and getattr(vp, "max_video_tokens", None):
            per_frame = max(min(vp.max_video_tokens * factor * factor, longest // num_frames), int(shortest * 1.05))
            max_pixels = per_frame * num_frames
        try:
            return smart_resize(num_frames, height, width, temporal_factor=temporal, factor=factor,
                                min_pixels=shortest, max_pixels=max_pixels)
        except ValueError as exc:  # the aspect ratio Qwen3-VL refuses
            raise MediaError(f"video frames of {width}x{height} pixels cannot be used: {exc}") from None

    return frame_size


def is_multimodal(processor) -> bool:
    return hasattr(processor, "image_processor")


def tokenizer_of(processor):
    return processor.tokenizer if is_multimodal(processor) else processor


def build_inputs(processor, conversations, add_generation_prompt: bool = True,
                 video: VideoOptions | None = None, continue_final_message: bool = False,
                 notes: list | None = None):
    """Processor outputs (input_ids, attention_mask, mm_token_type_ids, pixels, grids) for a batch.

    `conversations` is one chat (list of messages / string) or a list of chats. `notes`, if given,
    receives one line per video whose frames were spread over its duration to fit `max_frames`.
    """
    video = video or VideoOptions()
    if isinstance(conversations, str) or (isinstance(conversations, (list, tuple)) and conversations
                                          and isinstance(conversations[0], dict)):
        conversations = [conversations]
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise PromptError(f"give a chat (a string or a list of messages) or a list of chats, got "
                          f"{_describe(conversations)}")
    tokenizer = tokenizer_of(processor)
    chats = [escape_special_tokens(normalize_messages(c), tokenizer) for c in conversations]
    _check_continuation(chats, continue_final_message)
    tokenizer.padding_side = "left"
    template_kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message)
    texts = [processor.apply_chat_template(_placeholders(chat), **template_kwargs) for chat in chats]
    if is_multimodal(processor):
        texts = [lay_out_videos(text, processor, video.layout) for text in texts]
    media = [_load_media(chat, video, processor, notes) for chat in chats]
    images = [img for imgs, _ in media for img in imgs]
    videos = [vid for _, vids in media for vid in vids]
    if not is_multimodal(processor):
        if images or videos:
            raise MediaError("this model is text-only: it cannot take images or videos")
        return tokenizer(texts, padding=True, return_tensors="pt")
    kwargs = {}
    if videos:
        kwargs = dict(videos=[v.frames for v in videos], video_metadata=[v.metadata() for v in videos],
                      do_sample_frames=False)
    return processor(text=texts, images=images or None, padding=True, return_tensors="pt", **kwargs)


def _placeholders(chat):
    """The chat with media parts reduced to their type (the template only needs the type)."""
    return [
        {"role": m["role"], "content": [p if p["type"] == "text" else {"type": p["type"]} for p in m["content"]]}
        for m in chat
    ]


def tokens_by_modality(inputs, batch_index: int | None = None) -> dict[str, int]:
    """Prompt tokens per modality (text / image / video), padding excluded."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    types = inputs.get("mm_token_type_ids")
    types = torch.zeros_like(ids) if types is None else types
    if batch_index is not None:
        mask, types = mask[batch_index], types[batch_index]
    return {name: int(((types == code) & mask).sum()) for code, name in enumerate(MODALITY_NAMES)}
