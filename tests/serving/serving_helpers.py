"""Helpers of the server tests: a real `dbtrimkv serve` app on 127.0.0.1 (free port) in a thread, clients,
chat messages with the example digit images as data URIs."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path

import httpx

from dbtrimkv.serving.metrics import parse_metrics

EXAMPLES = Path(__file__).resolve().parents[2] / "demos" / "examples"


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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`dbtrimkv serve` in a subprocess (its memory is its own: /proc/PID/status), killable and restartable."""

    def __init__(self, *args: str, port: int | None = None, env: dict | None = None):
        self.args, self.port, self.env = list(args), port or free_port(), env
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.start()

    def start(self, timeout: float = 120) -> None:
        import os
        import subprocess
        import sys

        env = dict(os.environ, **(self.env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "dbtrimkv.cli", "serve", "--port", str(self.port),
                                      *self.args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"dbtrimkv serve exited: {self.proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("dbtrimkv serve did not become healthy")
            time.sleep(0.1)

    def status(self, key: str) -> int:
        """A /proc/PID/status value in bytes (VmRSS now, VmHWM peak)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.base_url + "/metrics", timeout=10).text)

    def kill(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except Exception:  # noqa: BLE001 - a server that will not stop is killed
                self.kill()
        self.proc.stderr.close()
