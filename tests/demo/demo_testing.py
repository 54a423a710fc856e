"""Settings and helpers shared by the demo tests (a plain module: every conftest is named `conftest`)."""

from __future__ import annotations

import socket

SERVED_BUDGET = 60  # the served demo's initial budget
MAX_VIDEO_SECONDS = 5.0
MAX_UPLOAD_MB = 1.0
QUEUE_SIZE = 4


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
