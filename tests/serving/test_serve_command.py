"""`dbtrimkv serve` flags: validated before the model loads; the start-up report states the pool and bound."""

from __future__ import annotations

import re
import socket

import pytest

from dbtrimkv.cli import main
from dbtrimkv.errors import ConfigError
from serving_helpers import free_port
from dbtrimkv.serving.admission import (Admission, Reservation, parse_kv_memory, request_bound, split_memory,
                                        view_columns)


@pytest.mark.parametrize("argv, message", [
    (["--kv-memory", "lots"], "--kv-memory must be a size"),
    (["--kv-memory", "1.5"], "fraction of device memory must be in (0, 1]"),
    (["--full-cache"], "--full-cache cannot be served"),
    (["--allow-media-dir", "/no/such/dir"], "is not a directory"),
    (["--api-key", " "], "--api-key must not be empty"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--prefill-chunk", "512", "--max-prefill-tokens-per-step", "256"], "must be at least --prefill-chunk (512)"),
    (["--engine-process", "--replicas", "2"], "--engine-process serves one engine"),
])
def test_bad_flags_fail_before_loading(argv, message, monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("dbtrimkv.loading.checkpoints.load_model", no_load)
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dbtrimkv: error: ") and message in err[-1]


def test_startup_report_and_listen_address(monkeypatch, capsys):
    calls = {}

    def run(server, sockets):
        calls.update(host=server.config.host, port=server.config.port, bound=sockets[0].getsockname())

    monkeypatch.setattr("uvicorn.Server.run", run)
    port = free_port()
    assert main(["serve", "--kv-memory", "2MiB", "--port", str(port)]) == 0
    assert calls["host"] == "127.0.0.1" and calls["port"] == port and calls["bound"] == ("127.0.0.1", port)
    err = capsys.readouterr().err
    # tiny-recall, default request (prefill chunk 2048): bound 12384 slots of 269 bytes; views of
    # 6 segments x (2064 + 258 headroom) columns x (K, V, bias: 65 x 4 bytes) + 6 row counts x 8
    bound, views = 12384, 6 * (2322 * 65 * 4 + 8)
    slots = 2 * 1024 * 1024 * bound // (bound * 269 + views)
    assert (slots, views) == (3734, 3622368)
    assert "KV memory: 2.0 MiB for the pool and the attention views together" in err
    assert f"KV pool: {slots} entries (980.9 KiB, 269 bytes each)" in err
    assert "Attention views (CPU: contiguous copies of the running requests' kept K/V): up to 1.0 MiB, 3.5 MiB " \
           "reserved per such request" in err
    assert "Per-request bound: budget 192 + 3 layers x 2 KV heads x max(buffer 32, prefill chunk 2048) = 12480" in err
    assert "A step prefills at most 2048 prompt tokens" in err


@pytest.mark.parametrize("max_running, together", [(2, 2), (64, 23)])
def test_startup_capacity_does_not_contradict_max_running(max_running, together, monkeypatch, capsys):
    monkeypatch.setattr("uvicorn.Server.run", lambda server, sockets: None)
    argv = ["serve", "--kv-memory", "8MiB", "--prefill-chunk", "64", "--port", str(free_port())]
    assert main([*argv, "--max-running", str(max_running)]) == 0
    err = capsys.readouterr().err
    fit = int(re.search(r"room for (\d+) such requests at once", err).group(1))
    assert fit == 23 and f"{together} of them run together (--max-running {max_running})" in err


def test_a_port_in_use_or_a_bad_host_fails_before_the_model_loads(monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("dbtrimkv.loading.checkpoints.load_model", no_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"dbtrimkv: error: cannot listen on 127.0.0.1:{port}: Address already in use"]
    assert main(["serve", "--host", "no-such-host.invalid", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dbtrimkv: error: --host 'no-such-host.invalid' does not resolve")


def test_pool_too_small_for_one_request(capsys):
    assert main(["serve", "--kv-memory", "50KiB"]) == 2
    assert "one request may hold up to" in capsys.readouterr().err


def test_engine_process_reports_and_refuses_as_the_in_process_server(monkeypatch, capsys):
    """`--engine-process`: the engine process's start-up report is the same text; its refusal to start
    is the same one `dbtrimkv: error:` line (exit 2), raised in the engine process."""
    monkeypatch.setattr("uvicorn.Server.run", lambda server, sockets: None)
    argv = ["serve", "--kv-memory", "2MiB", "--prefill-chunk", "64"]
    assert main([*argv, "--port", str(free_port())]) == 0
    in_process = capsys.readouterr().err
    assert main([*argv, "--port", str(free_port()), "--engine-process"]) == 0
    assert capsys.readouterr().err == in_process and "KV pool: " in in_process
    assert main(["serve", "--kv-memory", "50KiB", "--engine-process", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dbtrimkv: error: ") and "one request may hold up to" in err[-1]


def test_kv_memory_parsing():
    assert parse_kv_memory("4GiB") == ("bytes", 4 * 1024**3)
    assert parse_kv_memory("512MB") == ("bytes", 512e6)
    assert parse_kv_memory("0.5") == ("fraction", 0.5)
    assert parse_kv_memory("1000000") == ("bytes", 1e6)
    with pytest.raises(ConfigError):
        parse_kv_memory("0")


def test_admission_arithmetic():
    # budget + L*H*max(buffer, min(chunk, prompt)): the cache's own bound for the largest forward
    assert request_bound(96, 6, 32, 2048, 50) == 96 + 6 * 50
    assert request_bound(96, 6, 32, 2048, 10) == 96 + 6 * 32
    assert request_bound(96, 6, 32, 16, 5000) == 96 + 6 * 32
    admission = Admission(1000)  # no views (the kernels read the pool)
    admission.admit("a", Reservation(600))
    assert not admission.slots_fit(Reservation(500)) and admission.slots_fit(Reservation(400))
    admission.park("s", 300)
    assert not admission.slots_fit(Reservation(400)) and admission.slots_fit(Reservation(400), releasing=300)
    admission.release("a")
    admission.unpark("s")
    assert admission.reserved == 0 and admission.views_reserved() == 0


def test_view_reservations():
    # a request's view columns: its bound spread over its segments, or every token it can see if fewer
    assert view_columns(396, 6, 74, 32) == 66 + 32
    assert view_columns(396, 6, 40, 32) == 40 + 32
    assert view_columns(12384, 6, 10**6, 32) == 2064 + 2064 // 8
    row = lambda columns: 10 * columns  # noqa: E731 - bytes of one row's views
    admission = Admission(10_000, view_bytes=2000, row_view_bytes=row)
    admission.admit("a", Reservation(100, "g", 50))
    admission.admit("b", Reservation(100, "g", 30))
    assert admission.group_view_bytes("g") == 2 * 500  # rows x the widest: the batch is padded to it
    wide = Reservation(100, "g", 80)
    assert admission.views_reserved(wide) == 3 * 800 and not admission.views_fit(wide)
    assert admission.slots_fit(wide) and admission.alone_fits(wide)
    other = Reservation(100, "h", 80)  # another eviction setting: its own batch, its own padding
    assert admission.views_reserved(other) == 1000 + 800 and admission.views_fit(other)
    assert not admission.alone_fits(Reservation(100, "g", 201)) and not admission.alone_fits(Reservation(10_001))
    admission.release("a")
    assert admission.group_view_bytes("g") == 300


def test_memory_split():
    # the pool gets the share of one default request's bound; the views the rest; nothing is left over
    slots, views = split_memory(1_000_000, 269, 396, 150_000)
    assert slots == 1_000_000 * 396 // (396 * 269 + 150_000) and views == 1_000_000 - slots * 269
    assert split_memory(1_000_000, 269, 396, 0) == (1_000_000 // 269, 1_000_000 % 269)
