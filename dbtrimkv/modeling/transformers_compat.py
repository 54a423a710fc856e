"""The transformers releases dbtrimkv supports, and the names that differ between them.

Why: dbtrimkv hooks into transformers internals (the attention modules' call keywords, the
`Cache` API, the attention and mask interfaces), so a new release can break it silently. This
leaf module is the one place that knows (1) the tested range, which `pyproject.toml` declares as
its cap, (2) under which keyword a model call carries the KV cache (`past_key_values` up to 5.23,
`cache` from 5.24, where the old name is a deprecated alias until 5.40), (3) which text of the chat
template a Qwen3-VL processor replaces with a video's frames (from 5.25 the whole
`<|vision_start|><|video_pad|><|vision_end|>`, since it wraps every frame itself; before, only the
`<|video_pad|>` inside it, leaving an extra outer pair; `lay_out_videos` gives either layout on
either release, for training recipes that pin one), and (4) how to say, in one sentence, that
the installed release broke the integration contract. (From 5.25 transformers also imports the Hub's
`kernels` package, which `_hub_kernels_compat` keeps reachable from a checkout.)
"""

from __future__ import annotations

import inspect

import transformers
from packaging.version import Version
from transformers.models.qwen3.modeling_qwen3 import Qwen3Model

from ..errors import IntegrationError

OLDEST_SUPPORTED = "5.17"  # the oldest release CI tests (second install in .ci/run)
NEWEST_TESTED = "5.25"  # pyproject caps transformers below the next minor: raise both together
CACHE_KEYWORDS = ("cache", "past_key_values")  # new name first


def installed_version() -> str:
    return transformers.__version__


def supported_range() -> str:
    newest = Version(NEWEST_TESTED)
    return f">={OLDEST_SUPPORTED},<{newest.major}.{newest.minor + 1}"


def is_supported(version: str | None = None) -> bool:
    release = Version(Version(version or installed_version()).base_version)
    newest = Version(NEWEST_TESTED)
    return Version(OLDEST_SUPPORTED) <= release < Version(f"{newest.major}.{newest.minor + 1}")


def _preferred_cache_keyword() -> str:
    """The keyword model forwards (and so `generate`) take the cache under in the installed release."""
    parameters = inspect.signature(Qwen3Model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


CACHE_KWARG = _preferred_cache_keyword()


def cache_kwargs(cache) -> dict:
    """`{keyword: cache}` for the project's own `model(...)` / `generate(...)` calls (no deprecation warning)."""
    return {CACHE_KWARG: cache}


def cache_from_call(kwargs: dict):
    """The KV cache a module call received, under whichever keyword this release uses (None if none)."""
    for name in CACHE_KEYWORDS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


VIDEO_WRAPPER_COLLAPSED = Version(Version(installed_version()).base_version) >= Version("5.25")


def video_placeholder(processor) -> str:
    """The chat-template text that the processor replaces with one video's timestamped frames."""
    if VIDEO_WRAPPER_COLLAPSED:
        return processor.vision_start_token + processor.video_token + processor.vision_end_token
    return processor.video_token


VIDEO_LAYOUTS = ("installed", "wrapped")  # a video in the prompt: as this release writes it, or as <= 5.24 did


def lay_out_videos(text: str, processor, layout: str) -> str:
    """The rendered chat-template `text`, before the processor expands its videos, such that each video
    comes out in `layout`: "installed" (as the installed release writes it) or "wrapped" (as transformers
    <= 5.24 wrote it: the timestamped frame groups inside one more `<|vision_start|>`...`<|vision_end|>`
    pair, which 5.25 dropped). On 5.25 each placeholder is put inside that pair, which the processor
    leaves around the frames it writes in its place: the inputs are then those of 5.24, token for token.
    Training recipes pin "wrapped", so that they give the same batches on every supported release."""
    if layout not in VIDEO_LAYOUTS:
        raise ValueError(f"video layout must be one of {', '.join(VIDEO_LAYOUTS)}, got {layout!r}")
    if layout == "installed" or not VIDEO_WRAPPER_COLLAPSED:
        return text
    placeholder = video_placeholder(processor)
    return text.replace(placeholder, processor.vision_start_token + placeholder + processor.vision_end_token)


def integration_error(what: str) -> IntegrationError:
    """An error for a broken integration contract, naming the installed and the supported releases."""
    supported = "" if is_supported() else " (outside the supported range)"
    return IntegrationError(
        f"{what}: transformers {installed_version()} is installed{supported}; dbtrimkv supports "
        f"transformers{supported_range()} (pip install 'transformers{supported_range()}')"
    )
