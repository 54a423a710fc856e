"""Generated media for the fuzz and memory tests: bombs, odd modes, odd shapes, huge-frame clips.

Everything is written on the fly and small on disk (a 6000 px, 64-frame clip is ~7 MB: two intra
frames encoded once and muxed 64 times).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def png_bytes(width: int, height: int, bit_depth: int = 1, color_type: int = 0) -> bytes:
    """A valid PNG of `width` x `height` (all zero rows), written by hand so a huge one stays tiny."""
    bits = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type] * bit_depth
    row = b"\x00" + bytes((width * bits + 7) // 8)
    compressor, body = zlib.compressobj(9), b""
    chunk_rows = max(1, (1 << 20) // len(row))
    for start in range(0, height, chunk_rows):
        body += compressor.compress(row * min(chunk_rows, height - start))
    body += compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    head = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    palette = chunk(b"PLTE", bytes(3 * 2)) if color_type == 3 else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + palette + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def declared_size(data: bytes, fmt: str, width: int, height: int) -> bytes:
    """A small valid image whose header is patched to declare width x height (a decompression bomb)."""
    if fmt == "GIF":
        return data[:6] + struct.pack("<HH", width, height) + data[10:]
    if fmt == "JPEG":  # patch the SOF0 frame header
        at = data.index(b"\xff\xc0") + 5
        return data[:at] + struct.pack(">HH", height, width) + data[at + 4:]
    raise ValueError(fmt)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def write_big_clip(path, side: int = 6000, frames: int = 64, fps: int = 2) -> None:
    """A `side` x `side` H.264 clip of `frames` intra frames (two distinct pictures, muxed repeatedly)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "45", "x264-params": "keyint=1"}
        planes = np.full((side * 3 // 2, side), 16, np.uint8)
        packets = []
        for i in range(2):
            planes[:64] = 100 * i
            picture = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            picture.pts = i
            packets += list(stream.encode(picture))
        packets += list(stream.encode())
        time_base = packets[0].time_base
        for i in range(frames):
            packet = av.Packet(bytes(packets[i % 2]))
            packet.pts = packet.dts = int(i / (fps * time_base))
            packet.time_base, packet.stream, packet.is_keyframe = time_base, stream, True
            container.mux(packet)
