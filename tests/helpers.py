"""Helpers shared by the engine tests: random gates, chats, a brute-force eviction rule."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from dbtrimkv.modeling.gates import text_attention_modules


def random_image(seed: int, height: int = 64, width: int = 96) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def image_chat(image, text="What is in the image?"):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def video_chat(frames, text="What happens?"):
    return [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": text}]}]


PANGRAM = "The quick brown fox jumps over the lazy dog while seven wizards quietly hex the jovial bank clerks."


def gated_tiny_text(intermediate_size: int = 8):
    """`(model, tokenizer)`: the tiny text model with fresh retention gates attached."""
    import dbtrimkv
    from dbtrimkv.loading.tiny import build_tiny

    model, tokenizer = build_tiny("qwen3")
    dbtrimkv.attach_retention_gates(model, intermediate_size=intermediate_size)
    return model, tokenizer


def randomize_gates(model, seed: int = 0, scale: float = 0.5, bias: float = -2.0) -> None:
    """Give the gates varied outputs (fresh gates predict beta ~ 1 everywhere)."""
    gen = torch.Generator().manual_seed(seed)
    seen = set()
    with torch.no_grad():
        for module in text_attention_modules(model):
            for name, p in module.retention_gate.named_parameters(remove_duplicate=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if name == "bias":
                    p.copy_(bias + torch.randn(p.shape, generator=gen) * 1.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * scale / p.shape[-1] ** 0.5)


def brute_force_keep(entries, keep: int, seen: int, lookahead: int = 1):
    """entries: list of (layer, head, pos, log_beta); returns the set kept by the eviction contract (docs/architecture.md)."""
    import math

    def score(e):
        s = float(np.float32((seen + 1 - e[2])) * np.float32(e[3]))
        if lookahead > 1:
            beta = math.exp(e[3])
            s += math.log(sum(beta**k for k in range(lookahead)))
        return s

    ranked = sorted(entries, key=lambda e: (-score(e), -e[2], e[0], e[1]))
    return set((e[0], e[1], e[2]) for e in ranked[:keep]), score


def mixed_chats(kind: str):
    """A left-padded batch of two chats: `image` (two images), `video` (a clip and an image) or text."""
    if kind == "image":
        return [image_chat(random_image(1), "Hi?"), image_chat(random_image(2, 96, 128), "What is in this picture?")]
    if kind == "video":
        frames = [random_image(20 + i, 48, 64) for i in range(6)]
        return [video_chat(frames, "Describe the clip."), image_chat(random_image(3), "And this?")]
    return ["Hello", "Tell me a much longer story about caches, please."]


def plain_and_gated(variant: str, dtype=torch.float32):
    """Two copies of a tiny model, the second with randomized gates: `(plain, gated, processor)`."""
    import dbtrimkv
    from dbtrimkv.loading.tiny import build_tiny

    plain, processor = build_tiny(variant, dtype=dtype)
    gated, _ = build_tiny(variant, dtype=dtype)
    dbtrimkv.attach_retention_gates(gated, intermediate_size=32)
    randomize_gates(gated)
    return plain, gated, processor


def write_clip(path, frames: int, fps: int = 8, height: int = 48, width: int = 64, seed: int = 0,
               codec: str = "mpeg4"):
    """A random mp4 (PyAV). Clips with the same seed share their first frames, so a longer clip is
    the shorter one continued."""
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
