"""Soak and fault test of `dbtrimkv serve`: many clients, every kind of request, a SIGKILL and a restart.

One `dbtrimkv serve` (tiny-recall) runs in its own process with one injected fault: a request with
seed 666 makes its sampler raise (the server's code is unchanged; the patch is applied by this
script before the CLI starts). First every reference request is sent alone, one after another, and
its answer recorded. Then `--clients` threads send, until the time is up, a mix of:
- valid requests (greedy, or sampled with a seed) and streamed ones: the answer must equal the
  same request's answer alone;
- clients that disconnect after the first streamed piece;
- two-turn sessions (`session_id`): the second turn must equal its answer alone (from the parked
  cache), or, when the server lost the session (restart, or dropped for room), the answer the whole
  conversation gets alone, with a notice;
- bad requests: NaN temperature, an unknown field, a wrong model, a broken image, an oversized body;
  each must get its own 4xx;
- injected faults: must get a 500 naming the engine failure, and nothing else may.
Halfway the server is SIGKILLed and restarted on the same port; requests in flight or sent while
it is down fail to connect (counted, allowed only in that window). `/metrics` is sampled every
100 ms (pool + views bytes must stay within `--kv-memory`) and the server's resident memory every
100 ms from /proc (its growth over each run's warmed-up level must stay under `--rss-bound-mb`). At
the end the server must be healthy and idle with every pool slot accounted for (in use == reserved,
which is then the parked sessions' slots).

    nice -n 5 python bench/soak_serve.py --minutes 5 --out bench/results/soak_serve.json

`tests/serving/test_soak.py` runs the same soak for 30 s in CI. `--oversize-mb MB` instead sends
`--oversize-clients` bodies of `--max-request-mb MB` at once (text far over the prompt limit) to a
fresh server and reports their statuses and times and the server's peak resident memory growth
(VmHWM from /proc; `tests/serving/test_bounded_work.py` runs it with 4 x 8 MB).
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
FAULT_SEED = 666
MODEL = "tiny-recall"
SERVE_ARGS = ["--kv-memory", "2MiB", "--max-request-mb", "1", "--max-running", "8", "--max-queue", "256",
              "--max-sessions", "16"]
KV_MEMORY = 2 * 2**20


# --- the server process ------------------------------------------------------------------------
def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` and its live descendants (/proc/PID/stat fields 14-15)."""
    parents, ticks = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # (the command name may hold spaces)
        except OSError:  # the process ended meanwhile
            continue
        child = int(stat.parent.name)
        parents[child], ticks[child] = int(fields[1]), int(fields[11]) + int(fields[12])
    tree, frontier = {pid}, [pid]
    while frontier:
        frontier = [c for c, parent in parents.items() if parent in frontier and c not in tree]
        tree.update(frontier)
    return sum(ticks.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`dbtrimkv serve` in a subprocess (its memory is its own: /proc/PID/status), killable and restartable.
    With `faults`, a request with seed `FAULT_SEED` makes its sampler raise inside the server."""

    def __init__(self, *args: str, port: int | None = None, faults: bool = False, launcher: list[str] | None = None,
                 env: dict[str, str] | None = None):
        """`launcher`: the Python arguments that start the server (default: the CLI's `serve`; a benchmark
        passes its own script, e.g. to serve a model built in-process); `env`: extra environment."""
        self.args, self.port, self.faults = list(args), port or free_port(), faults
        if launcher is None:
            launcher = [__file__, "--serve-with-faults"] if faults else ["-m", "dbtrimkv.cli", "serve"]
        self.launcher, self.env = launcher, dict(env or {})
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.start()

    def start(self, timeout: float = 300) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", **self.env)
        self.proc = subprocess.Popen([sys.executable, *self.launcher, "--port", str(self.port), *self.args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
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

    def cpu_seconds(self) -> float:
        """User + system CPU seconds spent so far by the server and every process under it (an engine
        process included), from /proc: what one measured stretch cost the server, read before and after."""
        return tree_cpu_seconds(self.proc.pid)

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS

    def metrics(self) -> dict[str, float]:
        from dbtrimkv.serving.metrics import parse_metrics

        return parse_metrics(httpx.get(self.base_url + "/metrics", timeout=10).text)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc.stderr.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        if not self.proc.stderr.closed:
            self.proc.stderr.close()


def serve_with_faults(argv: list[str]) -> int:
    """The CLI's `serve`, with a sampler that raises for requests seeded `FAULT_SEED` (the injected fault)."""
    from dbtrimkv.cli import main
    from dbtrimkv.runner.sampling import Sampler

    real = Sampler.__call__

    def sample(self, logits):
        if self.params.seed == FAULT_SEED:
            raise RuntimeError("injected fault: this request's sampler failed")
        return real(self, logits)

    Sampler.__call__ = sample
    return main(["serve", *argv])


# --- requests ----------------------------------------------------------------------------------
def image_part(name: str) -> dict:
    data = base64.b64encode((ROOT / "demos" / "examples" / name).read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}}


@functools.lru_cache(maxsize=None)
def reference_requests() -> list[dict]:
    """Valid requests whose answer alone is recorded first (greedy and seeded-sampled)."""
    out = []
    for i, name in enumerate(("digit-911.png", "digit-912.png", "digit-913.png")):
        text = "which digit is in the image?"
        out.append({"messages": [{"role": "user", "content": [image_part(name), {"type": "text", "text": text}]}],
                    "max_tokens": 16, "temperature": 0})
        out.append({"messages": [{"role": "user", "content": [image_part(name), {"type": "text", "text": text}]}],
                    "max_tokens": 12, "temperature": 0.8, "seed": 100 + i, "ignore_eos": True})
    out.append({"messages": [{"role": "user", "content": "tell me a story about " + "rivers " * 20}],
                "max_tokens": 24, "temperature": 0, "ignore_eos": True})
    return out


@functools.lru_cache(maxsize=None)
def bad_requests() -> list[tuple[bytes, int]]:
    """(JSON body, expected status): each refused with its own 4xx."""
    ok = dict(reference_requests()[0], model=MODEL)
    broken = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no").decode()}}
    bodies = [
        (dict(ok, temperature=float("nan")), 400),
        (dict(ok, response_format={"type": "json_object"}), 400),
        (dict(ok, model="gpt-4"), 404),
        (dict(ok, messages=[{"role": "user", "content": [broken]}]), 400),
        (dict(ok, messages=[{"role": "user", "content": "x " * 600_000}]), 413),
    ]
    return [(json.dumps(body).encode(), status) for body, status in bodies]


def session_turns(name: str) -> tuple[list[dict], str]:
    first = [{"role": "user", "content": [image_part(name), {"type": "text", "text": "which digit is in the image?"}]}]
    return first, "and which digit was it again?"


def post(base: str, body, stream: bool = False, timeout: float = 60):
    content = body if isinstance(body, bytes) else json.dumps(dict(body, model=body.get("model", MODEL), stream=stream))
    return httpx.post(base + "/v1/chat/completions", content=content, timeout=timeout,
                      headers={"content-type": "application/json"})


def sse_events(response):
    """The JSON events of a server-sent-event response, in order (the final `[DONE]` left out)."""
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def streamed(base: str, body, disconnect: bool = False) -> tuple[int, str]:
    payload = json.dumps(dict(body, model=MODEL, stream=True))
    with httpx.stream("POST", base + "/v1/chat/completions", content=payload, timeout=60,
                      headers={"content-type": "application/json"}) as response:
        if response.status_code != 200:
            response.read()
            return response.status_code, ""
        pieces = []
        for event in sse_events(response):
            if "error" in event:
                return 500, event["error"]["message"]
            delta = event["choices"][0]["delta"].get("content") if event.get("choices") else None
            if delta:
                pieces.append(delta)
                if disconnect:
                    return 499, ""
        return 200, "".join(pieces)


# --- several maximum-size bodies at once --------------------------------------------------------
def text_body(size: int) -> bytes:
    """A chat request of exactly about `size` bytes whose text is far over any prompt limit."""
    head, tail = b'{"model":"tiny-recall","messages":[{"role":"user","content":"', b'"}]}'
    return head + b"lorem ipsum " * ((size - len(head) - len(tail)) // 12) + tail


def oversize(body_mb: int, clients: int) -> dict:
    """`clients` bodies of `--max-request-mb body_mb` at once to a fresh server: their statuses, the
    seconds each took, and the server's peak resident memory growth (VmHWM) over its level before."""
    server = ServeProcess("--kv-memory", "2MiB", "--max-request-mb", str(body_mb))
    try:
        post(server.base_url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        before = server.status("VmRSS")
        server.reset_peak()
        body = text_body(body_mb * 2**20)
        answers = []

        def send():
            start = time.monotonic()
            response = post(server.base_url, body, timeout=300)
            answers.append({"status": response.status_code, "seconds": round(time.monotonic() - start, 2),
                            "message": response.json()["error"]["message"]})

        threads = [threading.Thread(target=send) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        growth = server.status("VmHWM") - before
        chunks = (b"x" * 2**20 for _ in range(body_mb + 4))  # no Content-Length: cut off past the limit
        unsized = httpx.post(server.base_url + "/v1/chat/completions", content=chunks, timeout=60)
        healthy = httpx.get(server.base_url + "/health", timeout=10).status_code == 200
    finally:
        server.close()
    return {"body_bytes": len(body), "clients": clients, "answers": answers, "rss_before_mib": round(before / 2**20, 1),
            "peak_growth_mib": round(growth / 2**20, 1), "unsized_status": unsized.status_code,
            "unsized_message": unsized.json()["error"]["message"], "healthy": healthy}


# --- the soak ----------------------------------------------------------------------------------
class Soak:
    def __init__(self, seconds: float, clients: int, rss_bound: int, seed: int = 0):
        self.seconds, self.clients, self.rss_bound = seconds, clients, rss_bound
        self.rng = random.Random(seed)
        self.counts: Counter = Counter()
        self.problems: list[str] = []
        self.lock = threading.Lock()
        self.down = threading.Event()  # set while the server is being killed and restarted
        self.stop = threading.Event()
        self.metric_samples = 0
        self.kv_peak = 0
        self.rss: list[dict] = []

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)

    def count(self, kind: str) -> None:
        with self.lock:
            self.counts[kind] += 1

    # answers alone
    def references(self, base: str) -> None:
        self.alone = [post(base, body).json()["choices"][0]["message"]["content"] for body in reference_requests()]
        self.sessions = {}
        for name in ("digit-911.png", "digit-913.png"):
            first, follow = session_turns(name)
            one = post(base, {"messages": first, "max_tokens": 16, "temperature": 0, "session_id": f"ref-{name}"})
            reply = one.json()["choices"][0]["message"]["content"]
            history = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": follow}]
            cached = post(base, {"messages": history, "max_tokens": 16, "temperature": 0, "session_id": f"ref-{name}"})
            fresh = post(base, {"messages": history, "max_tokens": 16, "temperature": 0})
            self.sessions[name] = (reply, cached.json()["choices"][0]["message"]["content"],
                                   fresh.json()["choices"][0]["message"]["content"])

    def client(self, index: int) -> None:
        rng = random.Random(index)
        while not self.stop.is_set():
            kind = rng.choices(["valid", "stream", "disconnect", "session", "bad", "fault"], [5, 4, 1, 2, 2, 1])[0]
            try:
                getattr(self, "send_" + kind)(rng, index)
                self.count(kind)
            except Exception as exc:  # noqa: BLE001 - every failure is reported, none kills the client
                if self.down.is_set() and isinstance(exc, httpx.TransportError):
                    self.count("refused while restarting")
                    time.sleep(0.5)  # (the restarting server needs the CPU)
                else:
                    self.problem(f"{kind}: {type(exc).__name__}: {exc}")

    def send_valid(self, rng, index) -> None:
        k = rng.randrange(len(self.alone))
        response = post(self.base, reference_requests()[k])
        self.expect(response.status_code, 200, "valid")
        if response.status_code == 200 and response.json()["choices"][0]["message"]["content"] != self.alone[k]:
            self.problem(f"valid request {k}: {response.json()['choices'][0]['message']['content']!r} != "
                         f"alone {self.alone[k]!r}")

    def send_stream(self, rng, index) -> None:
        k = rng.randrange(len(self.alone))
        status, text = streamed(self.base, reference_requests()[k])
        self.expect(status, 200, "stream")
        if status == 200 and text != self.alone[k]:
            self.problem(f"streamed request {k}: {text!r} != alone {self.alone[k]!r}")

    def send_disconnect(self, rng, index) -> None:
        body = dict(reference_requests()[-1], max_tokens=200)
        status, _ = streamed(self.base, body, disconnect=True)
        self.expect(status, 499, "disconnect")

    def send_session(self, rng, index) -> None:
        name = rng.choice(sorted(self.sessions))
        reply, cached, fresh = self.sessions[name]
        session = f"c{index}-{rng.randrange(10**9)}"
        first, follow = session_turns(name)
        one = post(self.base, {"messages": first, "max_tokens": 16, "temperature": 0, "session_id": session})
        self.expect(one.status_code, 200, "session turn 1")
        if one.status_code != 200:
            return
        if one.json()["choices"][0]["message"]["content"] != reply:
            self.problem(f"session turn 1 {one.json()['choices'][0]['message']['content']!r} != {reply!r}")
        history = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": follow}]
        two = post(self.base, {"messages": history, "max_tokens": 16, "temperature": 0, "session_id": session})
        self.expect(two.status_code, 200, "session turn 2")
        if two.status_code != 200:
            return
        out = two.json()
        text, notice = out["choices"][0]["message"]["content"], out.get("dbtrimkv", {}).get("notice")
        usage = out["usage"]
        if usage["prompt_tokens_details"]["cached_tokens"] > usage["prompt_tokens"]:
            self.problem(f"session usage: cached {usage['prompt_tokens_details']['cached_tokens']} > prompt "
                         f"{usage['prompt_tokens']}")
        resumed = usage["prompt_tokens_details"]["cached_tokens"] > 0
        if text != (cached if resumed else fresh):
            self.problem(f"session turn 2 ({'cached' if resumed else 'prefilled again'}, notice {notice!r}): "
                         f"{text!r} != {cached if resumed else fresh!r}")
        self.count("session resumed" if resumed else "session prefilled again")

    def send_bad(self, rng, index) -> None:
        body, status = rng.choice(bad_requests())
        response = post(self.base, body)
        self.expect(response.status_code, status, "bad request")
        if set(response.json()) != {"error"}:
            self.problem(f"bad request: not an OpenAI error object: {response.text[:200]}")

    def send_fault(self, rng, index) -> None:
        body = dict(reference_requests()[1], seed=FAULT_SEED)
        response = post(self.base, body)
        self.expect(response.status_code, 500, "injected fault")
        if response.status_code == 500 and "injected fault" not in response.json()["error"]["message"]:
            self.problem(f"injected fault: {response.text[:200]}")

    def expect(self, got: int, want: int, what: str) -> None:
        if got != want and not (got == 503 and self.down.is_set()):
            self.problem(f"{what}: status {got}, expected {want}")
        if got >= 500 and want < 500 and not self.down.is_set():
            self.count("unexpected 5xx")

    def watch(self) -> None:
        while not self.stop.is_set():
            if not self.down.is_set():
                try:
                    m = self.server.metrics()
                    kv = m["dbtrimkv_kv_pool_bytes"] + m["dbtrimkv_kv_views_bytes"]
                    self.kv_peak = max(self.kv_peak, kv)
                    self.metric_samples += 1
                    if kv > KV_MEMORY:
                        self.problem(f"KV memory {kv} bytes > --kv-memory {KV_MEMORY}")
                    self.rss[-1]["peak"] = max(self.rss[-1]["peak"], self.server.status("VmRSS"))
                except (httpx.TransportError, FileNotFoundError, ProcessLookupError, KeyError):
                    pass
            time.sleep(0.1)

    def warm_up(self) -> None:
        """Load the server once (every kind of request), then record its resident memory as the run's level."""
        for body in reference_requests():
            post(self.base, body)
        for body, _ in bad_requests():
            post(self.base, body)
        level = self.server.status("VmRSS")
        self.rss.append({"level": level, "peak": level})

    def run(self) -> dict:
        self.server = ServeProcess(*SERVE_ARGS, faults=True)
        self.base = self.server.base_url
        started = time.monotonic()
        try:
            self.references(self.base)
            self.warm_up()
            threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(self.clients)]
            watcher = threading.Thread(target=self.watch, daemon=True)
            for t in threads + [watcher]:
                t.start()
            time.sleep(self.seconds / 2)
            self.down.set()
            self.server.kill()
            killed = time.monotonic()
            self.server.start()
            restart_s = time.monotonic() - killed
            self.warm_up()
            self.down.clear()
            time.sleep(self.seconds / 2)
            self.stop.set()
            for t in threads + [watcher]:
                t.join(90)
            end = self.final_state()
        finally:
            self.server.close()
        growth = max(r["peak"] - r["level"] for r in self.rss)
        if growth > self.rss_bound:
            self.problem(f"resident memory grew by {growth / 2**20:.0f} MiB over its warmed-up level "
                         f"(bound {self.rss_bound / 2**20:.0f} MiB)")
        return {
            "seconds": round(time.monotonic() - started, 1), "load_seconds": self.seconds, "clients": self.clients,
            "server_args": SERVE_ARGS, "requests": dict(self.counts), "problems": self.problems,
            "metric_samples": self.metric_samples, "kv_memory": KV_MEMORY, "kv_peak_bytes": int(self.kv_peak),
            "rss_mib": [{k: round(v / 2**20, 1) for k, v in r.items()} for r in self.rss],
            "rss_growth_mib": round(growth / 2**20, 1), "rss_bound_mib": round(self.rss_bound / 2**20),
            "restart_seconds": round(restart_s, 1), "end": end,
            "platform": {"python": platform.python_version(), "machine": platform.machine(),
                         "cpus": os.cpu_count()},
        }

    def final_state(self) -> dict:
        deadline = time.monotonic() + 30
        while True:
            m = self.server.metrics()
            if m["dbtrimkv_requests_running"] == 0 and m["dbtrimkv_requests_waiting"] == 0:
                break
            if time.monotonic() > deadline:
                self.problem(f"not idle at the end: {m['dbtrimkv_requests_running']} running")
                break
            time.sleep(0.1)
        healthy = httpx.get(self.base + "/health", timeout=10).status_code == 200
        if not healthy:
            self.problem("/health is not 200 at the end")
        if m["dbtrimkv_kv_slots_in_use"] != m["dbtrimkv_kv_slots_reserved"]:
            self.problem(f"slots in use {m['dbtrimkv_kv_slots_in_use']} != reserved {m['dbtrimkv_kv_slots_reserved']}"
                         " (parked sessions only): slots leaked")
        if post(self.base, reference_requests()[0]).json()["choices"][0]["message"]["content"] != self.alone[0]:
            self.problem("the server answers differently at the end")
        return {"healthy": healthy, "slots_in_use": m["dbtrimkv_kv_slots_in_use"],
                "sessions_parked": m["dbtrimkv_sessions_parked"],
                "batch_failures": m.get("dbtrimkv_batch_failures_total", 0)}


def oversize_markdown(result: dict) -> str:
    answers = result["answers"]
    return (f"{result['clients']} bodies of {result['body_bytes']} bytes at once: statuses "
            f"{sorted(a['status'] for a in answers)}, {max(a['seconds'] for a in answers)} s at most, peak resident "
            f"memory growth {result['peak_growth_mib']} MiB (server at {result['rss_before_mib']} MiB before); a body "
            f"without Content-Length: {result['unsized_status']}.")


def markdown(result: dict, command: str) -> str:
    req = result["requests"]
    rows = [f"| {k} | {v} |" for k, v in sorted(req.items())]
    return "\n".join([
        f"# dbtrimkv serve soak: {result['load_seconds'] / 60:.1f} minutes, {result['clients']} clients",
        "", f"Command: `{command}`", "",
        f"Server: `dbtrimkv serve {' '.join(result['server_args'])}` (tiny-recall), SIGKILLed and restarted halfway "
        f"(back in {result['restart_seconds']} s).", "",
        "| requests | count |", "| --- | --- |", *rows, "",
        f"- problems (wrong answers, unexpected statuses, 5xx other than the injected fault): "
        f"**{len(result['problems'])}**" + "".join(f"\n  - {p}" for p in result["problems"][:20]),
        f"- `/metrics` samples: {result['metric_samples']}; pool + views peak {result['kv_peak_bytes']} bytes "
        f"<= --kv-memory {result['kv_memory']}",
        f"- resident memory per run (MiB, warmed-up level and peak): {result['rss_mib']}; largest growth "
        f"{result['rss_growth_mib']} MiB (bound {result['rss_bound_mib']} MiB)",
        f"- at the end: healthy {result['end']['healthy']}, {result['end']['slots_in_use']:.0f} slots in use = "
        f"reserved ({result['end']['sessions_parked']:.0f} parked sessions)", ""])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-with-faults":
        return serve_with_faults(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="load duration (default: 10)")
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--rss-bound-mb", type=float, default=256.0,
                        help="allowed resident memory growth over each run's warmed-up level (default: 256)")
    parser.add_argument("--oversize-mb", type=int, default=0, metavar="MB",
                        help="instead of the soak: send --oversize-clients bodies of --max-request-mb MB at once and "
                             "measure the server's peak resident memory growth")
    parser.add_argument("--oversize-clients", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON result (a .md beside it); default bench/results/soak_serve.json or oversize.json")
    args = parser.parse_args()
    if not math.isfinite(args.minutes) or args.minutes <= 0 or args.clients < 1 or args.oversize_mb < 0:
        parser.error("--minutes must be > 0, --clients >= 1, --oversize-mb >= 0")
    command = "nice -n 5 python bench/soak_serve.py " + " ".join(sys.argv[1:])
    if args.oversize_mb:
        result = dict(oversize(args.oversize_mb, args.oversize_clients), command=command)
        text = f"# dbtrimkv serve: maximum-size bodies at once\n\nCommand: `{command}`\n\n{oversize_markdown(result)}\n"
        out = args.out or ROOT / "bench" / "results" / "oversize_bodies.json"
        failed = any(a["status"] != 413 for a in result["answers"]) or not result["healthy"]
    else:
        result = Soak(args.minutes * 60, args.clients, int(args.rss_bound_mb * 2**20)).run()
        result["command"] = command
        text = markdown(result, command)
        out = args.out or ROOT / "bench" / "results" / "soak_serve.json"
        failed = bool(result["problems"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
