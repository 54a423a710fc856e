"""`dbtrimkv serve` flags: validated before the model loads; the start-up report states the pool and bound."""

from __future__ import annotations

import pytest

from dbtrimkv.cli import main
from dbtrimkv.errors import ConfigError
from dbtrimkv.serving.admission import Admission, parse_kv_memory, request_bound


@pytest.mark.parametrize("argv, message", [
    (["--kv-memory", "lots"], "--kv-memory must be a size"),
    (["--kv-memory", "1.5"], "fraction of device memory must be in (0, 1]"),
    (["--full-cache"], "--full-cache cannot be served"),
    (["--allow-media-dir", "/no/such/dir"], "is not a directory"),
    (["--api-key", " "], "--api-key must not be empty"),
    (["--port", "70000"], "--port must be in 0..65535"),
])
def test_bad_flags_fail_before_loading(argv, message, monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("dbtrimkv.checkpoints.load_model", no_load)
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dbtrimkv: error: ") and message in err[-1]


def test_startup_report_and_listen_address(monkeypatch, capsys):
    calls = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: calls.update(kwargs))
    assert main(["serve", "--kv-memory", "2MiB", "--port", "8123"]) == 0
    assert calls["host"] == "127.0.0.1" and calls["port"] == 8123
    err = capsys.readouterr().err
    slots = 2 * 1024 * 1024 // (2 * 32 * 4 + 13)
    assert f"KV pool: {slots} entries" in err
    assert "Per-request bound: budget 96 + 3 layers x 2 KV heads x max(buffer 32, prefill chunk 2048) = 12384" in err


def test_pool_too_small_for_one_request(capsys):
    assert main(["serve", "--kv-memory", "50KiB"]) == 2
    assert "one request needs up to" in capsys.readouterr().err


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
    admission = Admission(1000)
    admission.admit("a", 600)
    assert not admission.fits(500) and admission.fits(400)
    admission.park("s", 300)
    assert not admission.fits(400) and admission.fits(400, releasing=300)
    admission.release("a")
    admission.unpark("s")
    assert admission.reserved == 0
