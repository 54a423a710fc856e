"""The demo shows errors without server paths."""

from __future__ import annotations

from dbtrimkv.demos.gradio_demo import user_message_of
from dbtrimkv.errors import MediaError


def test_errors_name_uploads_by_file_name_only():
    upload = "/tmp/gradio/0a1b2c/cat.png"
    text = user_message_of(MediaError(f"cannot read image {upload}: bad file (at /usr/lib/x/y.py)"), upload, None)
    assert text == "cannot read image cat.png: bad file (at y.py)"
    text = user_message_of(RuntimeError("died in /srv/models/m/weights.bin"), None, None, unexpected=True)
    assert "/srv" not in text and "weights.bin" in text and "RuntimeError" in text
