"""Read images for the processor in bounded memory, with clear errors for bad files.

Why: a small file can declare an enormous picture (a 12 KB PNG of 10000 x 10000 pixels). So the size
is read from the header before any pixel is decoded; a file whose decoded pixels would need more than
`MAX_IMAGE_DECODE_BYTES` (in its own pixel format) is refused with a `MediaError`, as are empty images
and aspect ratios over `MAX_ASPECT_RATIO` (Qwen3-VL's processor rejects those). Larger images are
downscaled while decoding (JPEG `draft`, then `reduce` / `thumbnail`) to at most `IMAGE_MAX_PIXELS`
(the real Qwen3-VL image processor's own ceiling). Videos: `media.py`.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import MediaError

MAX_IMAGE_DECODE_BYTES = 256 * 2**20  # decoded pixels, in the file's own format, before downscaling
IMAGE_MAX_PIXELS = 16_777_216  # images are downscaled to at most this many pixels (Qwen3-VL's longest_edge)
MAX_ASPECT_RATIO = 200  # Qwen3-VL's processors refuse longer / thinner images

# bytes per pixel while decoding and converting, by PIL mode ("1" and "P" need a converted copy)
_DECODE_BYTES_PER_PIXEL = {"1": 2, "L": 1, "P": 4, "PA": 5, "LA": 2, "La": 2, "RGB": 3, "YCbCr": 3, "LAB": 3,
                           "HSV": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4, "I;16": 2}


def _image_source(image):
    """A path or a binary file object for PIL, from the accepted input types."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        if len(image) == 0:
            raise MediaError("image bytes are empty")
        return io.BytesIO(bytes(image)), "from bytes"
    if hasattr(image, "read"):
        return image, "from a file object"
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not str(image):
            raise MediaError("image path is empty")
        if not path.exists():
            raise not_found("image", image)
        if not path.is_file():
            raise MediaError(f"image path is not a file: {path}")
        return path, str(path)
    raise MediaError(f"an image must be a path, bytes, a binary file object, a PIL image or an HxWx3 array, "
                     f"got {type(image).__name__}")


def not_found(kind: str, path) -> MediaError:
    """The refusal of a missing media path, as given (a URL is not fetched: say so, and do not show it
    mangled into a path)."""
    if isinstance(path, str) and re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", path):
        return MediaError(f"{kind} not found: {path} (URLs are not fetched here: download the file and pass its "
                          f"path, or its bytes)")
    return MediaError(f"{kind} not found: {path}")


def too_many_pixels(name: str, exc: Exception) -> MediaError:
    """The one refusal of an image whose header declares more pixels than PIL decodes safely (the
    pipeline's and the server's header checks both raise it)."""
    return MediaError(f"image {name} declares too many pixels to decode safely ({exc})")


def unreadable(name: str, exc: Exception) -> MediaError:
    """The one refusal of a file that is not a readable image (pipeline and server alike)."""
    return MediaError(f"cannot read image {name}: not a valid or complete image file ({exc})")


def check_image_size(width: int, height: int, what: str = "image") -> None:
    """Refuse empty images and aspect ratios Qwen3-VL cannot take."""
    if width <= 0 or height <= 0:
        raise MediaError(f"{what} is empty ({width}x{height} pixels)")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise MediaError(f"{what} is {width}x{height} pixels: the aspect ratio must be at most {MAX_ASPECT_RATIO}:1")


def fit_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, to at most `max_pixels` (unchanged if it fits)."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def _downscaled_rgb(img: Image.Image, max_pixels: int) -> Image.Image:
    """An RGB copy of a loaded image, at most `max_pixels` pixels (the resize runs before the RGB copy)."""
    if img.mode == "1":
        img = img.convert("L")
    elif img.mode not in ("L", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
    target = fit_pixels(*img.size, max_pixels)
    if target != img.size:
        img = img.resize(target, Image.BICUBIC, reducing_gap=2.0)
    return img.convert("RGB")


def _array_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise MediaError(f"image array must have shape HxW, HxWx1, HxWx3 or HxWx4, got {tuple(array.shape)}")
    check_image_size(array.shape[1], array.shape[0], "image array")
    if array.shape[0] * array.shape[1] * 4 > MAX_IMAGE_DECODE_BYTES:
        raise MediaError(f"image array of {array.shape[1]}x{array.shape[0]} pixels is too large")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype.kind in "iu":
        if array.dtype != np.uint8 and (array.min() < 0 or array.max() > 255):
            raise MediaError(f"integer image array values must be in 0..255, got {array.min()}..{array.max()}")
    elif array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise MediaError("image array contains NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 255:
            raise MediaError(f"float image array values must be in 0..1 (or 0..255), got {low:g}..{high:g}")
        array = array * 255 if high <= 1 else array
        array = np.rint(array)
    else:
        raise MediaError(f"image array must hold numbers, got dtype {array.dtype}")
    array = np.ascontiguousarray(array.astype(np.uint8))
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(array)


def load_image(image, max_pixels: int = IMAGE_MAX_PIXELS) -> Image.Image:
    """An RGB PIL image of at most `max_pixels` pixels from a path, bytes, a binary file object, a PIL
    image or an HxW(x1/3/4) array. Raises `MediaError` for anything that is not a usable image."""
    if image is None:
        raise MediaError("image is None: give a path, bytes, a PIL image or an array")
    if isinstance(image, Image.Image):
        check_image_size(*image.size)
        return _downscaled_rgb(image, max_pixels)
    if isinstance(image, np.ndarray):
        return _downscaled_rgb(_array_image(image), max_pixels)
    source, name = _image_source(image)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap follows
            with Image.open(source) as img:  # reads the header only
                width, height = img.size
                check_image_size(width, height, f"image {name}")
                if img.format == "JPEG" and width * height > max_pixels:
                    img.draft("RGB", fit_pixels(width, height, max_pixels))  # DCT scaling while decoding
                need = img.size[0] * img.size[1] * _DECODE_BYTES_PER_PIXEL.get(img.mode, 4)
                if need > MAX_IMAGE_DECODE_BYTES:
                    raise MediaError(f"image {name} declares {width}x{height} pixels ({img.mode}): decoding it "
                                     f"would need {need / 2**20:.0f} MiB, over the {MAX_IMAGE_DECODE_BYTES // 2**20} "
                                     f"MiB limit")
                img.load()
                return _downscaled_rgb(img, max_pixels)
    except Image.DecompressionBombError as exc:
        raise too_many_pixels(name, exc) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, MemoryError, TypeError,
            IndexError, struct.error) as exc:
        if isinstance(exc, MediaError):
            raise
        raise unreadable(name, exc) from None
