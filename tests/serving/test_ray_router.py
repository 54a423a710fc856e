"""The replica router's rule, the in-process ASGI bridge and the metrics merge, without a Ray cluster."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray.serve")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import StreamingResponse  # noqa: E402

from dbtrimkv.serving.metrics import Metrics, parse_metrics  # noqa: E402
from dbtrimkv.serving.ray_bridge import call_app, merge_metrics  # noqa: E402
from dbtrimkv.serving.ray_router import ReplicaView, rank_replicas  # noqa: E402


def test_most_free_admission_capacity_first():
    replicas = [ReplicaView("a", free_slots=100, request_bound=40), ReplicaView("b", free_slots=300, request_bound=40),
                ReplicaView("c", free_slots=200, request_bound=40)]
    assert rank_replicas(replicas) == ["b", "c", "a"]
    replicas[1].sent_since_report = 3  # b got three requests since its report: 300 - 120 < 200
    assert rank_replicas(replicas) == ["c", "b", "a"]


def test_ties_go_to_fewer_running_then_id():
    replicas = [ReplicaView("b", 50, running=1), ReplicaView("a", 50, running=1), ReplicaView("c", 50, running=0)]
    assert rank_replicas(replicas) == ["c", "a", "b"]


def test_sessions_stick_to_their_replica():
    replicas = [ReplicaView("a", 500), ReplicaView("b", 10, sessions=frozenset({"s1"})), ReplicaView("c", 5)]
    assert rank_replicas(replicas, "s1") == ["b", "a", "c"]  # held by b, however full
    assert rank_replicas(replicas, "s1", home="c") == ["c", "b", "a"]  # where this router last sent it wins
    assert rank_replicas(replicas, "s2") == ["a", "b", "c"]  # unknown session: most room
    assert rank_replicas(replicas, "s1", home="gone") == ["b", "a", "c"]  # its home replica died


def test_call_app_streams_the_apps_answer():
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request):
        body = await request.body()

        async def chunks():
            for i in range(3):
                yield body + request.url.query.encode() + str(i).encode()

        return StreamingResponse(chunks(), media_type="text/plain", headers={"x-test": "1"})

    async def run():
        items = [item async for item in call_app(app, "POST", "/echo?q=1", [("content-type", "text/plain")], b"hi")]
        return items

    items = asyncio.run(run())
    assert items[0]["status"] == 200 and ("x-test", "1") in items[0]["headers"]
    assert items[1:] == [b"hiq=10", b"hiq=11", b"hiq=12"]


def test_merged_metrics_label_every_replica():
    texts = {}
    for replica, running in (("r1", 2), ("r2", 5)):
        m = Metrics()
        m.set("requests_running", running)
        m.inc("requests_finished_total", 3, label=("reason", "stop"))
        texts[replica] = m.render()
    merged = merge_metrics(texts)
    values = parse_metrics(merged)
    assert values['dbtrimkv_requests_running{replica="r1"}'] == 2
    assert values['dbtrimkv_requests_running{replica="r2"}'] == 5
    assert values['dbtrimkv_requests_finished_total{replica="r2",reason="stop"}'] == 3
    assert merged.count("# TYPE dbtrimkv_requests_running gauge") == 1
    lines = merged.splitlines()  # a family's samples follow its HELP / TYPE lines, all replicas together
    start = lines.index("# TYPE dbtrimkv_requests_running gauge")
    assert lines[start + 1: start + 3] == ['dbtrimkv_requests_running{replica="r1"} 2',
                                           'dbtrimkv_requests_running{replica="r2"} 5']


def test_serve_replicas_flag_builds_the_ray_application(monkeypatch, tmp_path):
    from dbtrimkv import cli
    from dbtrimkv.serving import ray_app

    calls = []
    monkeypatch.setattr(ray_app, "run", lambda *args: calls.append(args) or 0)
    monkeypatch.setattr("dbtrimkv.loading.checkpoints.load_model", lambda *a, **k: pytest.fail("the driver loaded the model"))
    store = tmp_path / "store"
    assert cli.main(["serve", "--replicas", "2", "--budget", "64", "--port", "8123", "--session-store", str(store),
                     "--ray-address", "auto"]) == 0
    (spec, replicas, host, port, address, gpus), = calls
    assert (replicas, host, port, address) == (2, "127.0.0.1", 8123, "auto")
    assert spec.eviction["budget"] == 64 and spec.model is None
    assert spec.options.session_store == store and spec.options.session_write_through and store.is_dir()
