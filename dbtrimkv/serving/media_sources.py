"""Images and videos named by a request: data URIs always; local files and remote URLs only if allowed.

Why: a server must read no file a client names and fetch nothing a client points at unless its
operator said so. `data:` URIs are decoded in memory; `file://` URLs and paths only under
`--allow-media-dir DIR`; `http(s)://` URLs only with `--allow-remote-media` (size-capped,
time-limited). An image's size is read from its header and charged to the request's
`MediaBudget` before it is decoded (`dbtrimkv.inputs.media` refuses what its header says is too large).
Decoding problems become one clear `BadRequest` naming the message part, never showing an object
repr or a server path (an uploaded video's temporary file is "the uploaded video").
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from ..errors import MediaError
from ..inputs.images import IMAGE_MAX_PIXELS, load_image, too_many_pixels, unreadable
from ..inputs.media import Video, load_video
from . import refusals
from .api_errors import BadRequest, TooLarge
from .request_bounds import MediaBudget


@dataclass(frozen=True)
class MediaPolicy:
    allow_dir: Path | None = None
    allow_remote: bool = False
    max_bytes: int = 64 * 1024 * 1024
    video_fps: float = 2.0
    video_max_frames: int = 64
    timeout: float = 10.0
    image_max_pixels: int = IMAGE_MAX_PIXELS  # images are downscaled to this while decoding
    max_pixels_per_request: int | None = None  # decoded image / video pixels a request may hold (None: no cap)

    def budget(self) -> MediaBudget:
        return MediaBudget(self.max_pixels_per_request)


def load_image_url(url: str, policy: MediaPolicy, where: str, budget: MediaBudget | None = None):
    data = _read(url, policy, where, "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # dbtrimkv.inputs.media's cap applies
            with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as img:  # the header only
                width, height = img.size
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:  # dbtrimkv.inputs.images' words
        name = str(data) if isinstance(data, Path) else "from bytes"  # load_image's name for it
        refusal = too_many_pixels if isinstance(exc, Image.DecompressionBombError) else unreadable
        raise BadRequest(f"{where}: {_clean(refusal(name, exc), data)}", param=where) from None
    if budget is not None:
        budget.spend(min(width * height, policy.image_max_pixels), where)
    try:
        return load_image(data, policy.image_max_pixels)
    except MediaError as exc:  # dbtrimkv.inputs.images' own words (the pipeline's), after the message part
        raise BadRequest(f"{where}: {_clean(exc, data)}", param=where) from None


def load_video_url(url: str, policy: MediaPolicy, where: str, budget: MediaBudget | None = None) -> Video:
    data = _read(url, policy, where, "video")
    try:
        if isinstance(data, Path):
            video = load_video(data, fps=policy.video_fps, max_frames=policy.video_max_frames)
        else:
            handle, name = tempfile.mkstemp(suffix=".video")
            try:
                with os.fdopen(handle, "wb") as f:
                    f.write(data)
                video = load_video(name, fps=policy.video_fps, max_frames=policy.video_max_frames)
            except MediaError as exc:
                raise MediaError(str(exc).replace(name, "the uploaded video")) from None
            finally:
                os.unlink(name)
            video.source = "the uploaded video"
    except MediaError as exc:
        raise BadRequest(f"{where}: {_clean(exc, data)}", param=where) from None
    if budget is not None:
        budget.spend(int(video.frames.shape[0] * video.frames.shape[1] * video.frames.shape[2]), where)
    return video


def _clean(exc: Exception, data) -> str:
    """The error's text without object reprs or the server's own paths."""
    text = str(exc)
    if isinstance(data, Path):
        text = text.replace(str(data), data.name)
    return text


def _read(url: str, policy: MediaPolicy, where: str, kind: str) -> bytes | Path:
    if not isinstance(url, str) or not url:
        raise BadRequest(f"{where}: the {kind} url must be a non-empty string", param=where)
    if url.startswith("data:"):
        return _data_uri(url, policy, where)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise BadRequest(f"{where}: remote {kind} URLs are refused (send a data: URI, or start the server with "
                             "--allow-remote-media)", param=where)
        return _download(url, policy, where)
    if scheme in ("", "file"):
        return _local_file(unquote(urlparse(url).path) if scheme == "file" else url, policy, where, kind)
    raise BadRequest(f"{where}: unsupported {kind} URL scheme {scheme!r} (use a data: URI)", param=where)


def _data_uri(url: str, policy: MediaPolicy, where: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise BadRequest(f"{where}: a data URI must look like data:<mime>;base64,<data>", param=where)
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise TooLarge(refusals.media_too_large(where, policy.max_bytes), param=where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where}: the data URI is not valid base64", param=where) from None


def _local_file(path: str, policy: MediaPolicy, where: str, kind: str) -> Path:
    if policy.allow_dir is None:
        raise BadRequest(f"{where}: local {kind} paths are refused (send a data: URI, or start the server with "
                         "--allow-media-dir DIR)", param=where)
    resolved = Path(path).resolve()
    root = policy.allow_dir.resolve()
    if not resolved.is_relative_to(root):
        raise BadRequest(f"{where}: {kind} path is outside the allowed media directory (--allow-media-dir)",
                         param=where)
    if not resolved.is_file():
        raise BadRequest(f"{where}: {kind} not found: {path}", param=where)
    if resolved.stat().st_size > policy.max_bytes:
        raise TooLarge(refusals.media_too_large(where, policy.max_bytes), param=where)
    return resolved


def _download(url: str, policy: MediaPolicy, where: str) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=policy.timeout, follow_redirects=True) as response:
            response.raise_for_status()
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > policy.max_bytes:
                    raise TooLarge(refusals.media_too_large(where, policy.max_bytes), param=where)
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise BadRequest(f"{where}: cannot fetch {url}: {exc}", param=where) from None
