"""Helpers of the server tests: a real `dbtrimkv serve` app on 127.0.0.1 (free port) in a thread, clients,
chat messages with the example digit images as data URIs."""

from __future__ import annotations

import base64
import sys
import threading
import time
from pathlib import Path

import httpx

from dbtrimkv.serving.metrics import parse_metrics

EXAMPLES = Path(__file__).resolve().parents[2] / "demos" / "examples"
sys.path.insert(0, str(EXAMPLES.parents[1] / "bench"))
from soak_serve import ServeProcess, free_port  # noqa: E402,F401 - the one `dbtrimkv serve` subprocess helper


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_message(digit_file: str = "digit-911.png", text: str = "which digit is in the image?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(EXAMPLES / digit_file)}},
                                         {"type": "text", "text": text}]}]


class RunningServer:
    def __init__(self, app, engine):
        import uvicorn

        self.engine = engine
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"

    def openai(self, **kwargs):
        from openai import OpenAI

        kwargs.setdefault("api_key", "unused")
        return OpenAI(base_url=self.base_url + "/v1", max_retries=0, timeout=60, **kwargs)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.base_url + "/metrics", timeout=10).text)

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """Metrics once nothing runs or waits (requests retire at the next token boundary)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["dbtrimkv_requests_running"] == 0 and m["dbtrimkv_requests_waiting"] == 0:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server still busy: {m}")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def start_server(pipeline, **options) -> RunningServer:
    from dbtrimkv.serving import ServerOptions, create_server

    http = options.pop("http", None)
    opts = ServerOptions(**options) if http is None else ServerOptions(http=http, **options)
    app, engine = create_server(pipeline.model, pipeline.processor, pipeline.config, opts)
    return RunningServer(app, engine)

