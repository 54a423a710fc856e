"""`dbtrimkv serve --replicas 2` on a local Ray cluster (CPU, tiny-recall): the same answers as one server,
sessions sticking to one replica, and a replica killed under load losing no session and no answer."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from dbtrimkv.serving.ray_app import REPLICA_HEADER, ReplicaSpec, build_application  # noqa: E402
from dbtrimkv.serving.server import ServerOptions  # noqa: E402
from serving_helpers import free_port, image_message, start_server  # noqa: E402

KV = ("bytes", 2 * 2**20)
LONG = 1000  # tokens per request under load (ignore_eos): long enough to be in flight when the replica dies
DIGITS = ["digit-911.png", "digit-912.png", "digit-913.png"]
pytestmark = pytest.mark.timeout(300)


def _ray(*args: str, env: dict | None = None) -> None:
    """Run the `ray` command line (ray.scripts.scripts) in a fresh process."""
    command = [sys.executable, "-c", "from ray.scripts.scripts import main; main()", *args]
    subprocess.run(command, env=env, check=True, timeout=180, capture_output=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # The head starts in a fresh process (`ray start --head`), not through ray.init() here: ray.init() forks
    # its GCS server with a Python preexec_fn, and a fork from this test process, which holds the threads
    # of earlier tests' servers, can deadlock in the child before it execs (CI hung there for 300 s).
    # Without token authentication on either end: Ray 2.60 turns it on for a head started where a token file
    # exists, and this driver (RAY_AUTH_MODE read when ray was imported) connects without one. The head's
    # node address is the loopback one.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "RAY_AUTH_MODE": "disabled"}
    gcs = f"127.0.0.1:{free_port()}"
    _ray("start", "--head", f"--port={gcs.rsplit(':', 1)[1]}", "--node-ip-address=127.0.0.1", "--num-cpus=4",
         "--include-dashboard=false", "--disable-usage-stats", env=env)
    try:
        ray.init(address=gcs, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = ServerOptions(kv_memory=KV, session_store=tmp_path_factory.mktemp("store"),
                                session_write_through=True)
        eviction = {"config": None, "full_cache": False, "policy_options": None}
        serve.run(build_application(ReplicaSpec(None, "cpu", None, eviction, options), 2), name="dbtrimkv",
                  route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while httpx.get(url + "/health", timeout=30).status_code != 200:  # both replicas up
            assert time.monotonic() < deadline, "the replicas did not start"
            time.sleep(0.5)
        yield url
        serve.shutdown()
    finally:
        ray.shutdown()
        _ray("stop", "--force")


@pytest.fixture(scope="module")
def single(recall_pipeline):
    server = start_server(recall_pipeline, kv_memory=KV)
    yield server.base_url
    server.close()


def chat(url, messages, session=None, max_tokens=12, ignore_eos=False):
    body = {"model": "tiny-recall", "messages": messages, "temperature": 0, "max_tokens": max_tokens,
            "ignore_eos": ignore_eos}
    if session is not None:
        body["session_id"] = session
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json(), response.headers.get(REPLICA_HEADER)


def next_turn(messages, answer):
    return messages + [{"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
                       {"role": "user", "content": "which digit is in the image? say it again"}]


def test_answers_equal_one_server(cluster, single):
    for digit in DIGITS:
        want, _ = chat(single, image_message(digit))
        got, replica = chat(cluster, image_message(digit))
        assert got["choices"][0]["message"] == want["choices"][0]["message"]
        assert got["usage"] == want["usage"] and replica
    deadline = time.monotonic() + 20  # /metrics covers every replica (from their routing stats)
    while len({k.split('replica="')[1].split('"')[0] for k in _metrics(cluster) if 'replica="' in k}) < 2:
        assert time.monotonic() < deadline, _metrics(cluster)
        time.sleep(0.5)


def _metrics(url) -> dict:
    from dbtrimkv.serving.metrics import parse_metrics

    return parse_metrics(httpx.get(url + "/metrics", timeout=30).text)


def test_a_sessions_turns_land_on_one_replica(cluster):
    for n, digit in enumerate(DIGITS):
        messages, replicas = image_message(digit), set()
        for turn in range(3):
            answer, replica = chat(cluster, messages, session=f"stick-{n}")
            replicas.add(replica)
            assert (answer["usage"]["prompt_tokens_details"]["cached_tokens"] > 0) == (turn > 0)
            messages = next_turn(messages, answer)
        assert len(replicas) == 1


def test_a_replica_killed_under_load_loses_no_session_and_no_answer(cluster, single):
    sessions = {}
    for n, digit in enumerate(DIGITS):  # first turns, then kill the replica holding the first session
        answer, replica = chat(cluster, image_message(digit), session=f"kill-{n}")
        sessions[f"kill-{n}"] = (next_turn(image_message(digit), answer), replica, answer["usage"])
    victim = sessions["kill-0"][1]
    expected = {d: chat(single, image_message(d), None, LONG, True)[0]["choices"][0]["message"]["content"]
                for d in DIGITS}
    load = [DIGITS[i % 3] for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(chat, cluster, image_message(d), None, LONG, True) for d in load]
        time.sleep(1.5)
        running = sum(not f.done() for f in futures)
        actor = ray.get_actor(f"SERVE_REPLICA::dbtrimkv#EngineReplica#{victim}", namespace="serve")
        ray.kill(actor)
        results = [f.result() for f in futures]  # every request answered (re-sent when its replica died)
    resent = _metrics(cluster)["dbtrimkv_ingress_resent_total"]
    print(f"replica kill: {running} of {len(load)} requests in flight, {resent:.0f} re-sent, "
          f"{len(results)} answered, all equal to one server's")
    assert running > 0 and resent >= 1  # the kill hit requests in flight
    assert [r[0]["choices"][0]["message"]["content"] for r in results] == [expected[d] for d in load]
    for session, (messages, _, first) in sessions.items():  # every session resumes without re-prefill
        answer, replica = chat(cluster, messages, session=session)
        assert replica != victim
        cached = answer["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == first["prompt_tokens"] + first["completion_tokens"] - 1
        want, _ = chat(single, messages, session=f"ref-{session}-{os.getpid()}")
        assert answer["choices"][0]["message"] == want["choices"][0]["message"]
    deadline = time.monotonic() + 180
    while _replica_states() != {"RUNNING": 2}:  # Ray Serve replaces the killed replica
        assert time.monotonic() < deadline, _replica_states()
        time.sleep(1)
    answer, replica = chat(cluster, image_message(DIGITS[0]))
    assert replica != victim and answer["choices"][0]["message"]["content"] == expected_short(single, DIGITS[0])


def expected_short(url, digit) -> str:
    return chat(url, image_message(digit))[0]["choices"][0]["message"]["content"]


def _replica_states() -> dict:
    deployment = serve.status().applications["dbtrimkv"].deployments["EngineReplica"]
    return {str(getattr(state, "value", state)): count for state, count in deployment.replica_states.items() if count}


def test_a_client_that_goes_away_frees_its_replica(cluster):
    body = {"model": "tiny-recall", "messages": image_message(), "max_tokens": 4000, "ignore_eos": True,
            "stream": True, "temperature": 0}
    with httpx.stream("POST", cluster + "/v1/chat/completions", json=body, timeout=60) as response:
        replica = response.headers[REPLICA_HEADER]
        next(response.iter_lines())  # the stream started; then the client hangs up
    cancelled = f'dbtrimkv_requests_finished_total{{replica="{replica}",reason="cancelled"}}'
    deadline = time.monotonic() + 20
    while _metrics(cluster).get(cancelled, 0) < 1:  # the replica cancelled it (reported with its stats)
        assert time.monotonic() < deadline, _metrics(cluster)
        time.sleep(0.5)
