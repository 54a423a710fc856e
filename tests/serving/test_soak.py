"""The soak and fault test (bench/soak_serve.py) for 30 s: many clients mixing valid, streamed,
disconnecting, session, bad and fault-injected requests, with a SIGKILL and restart halfway."""

from __future__ import annotations

import pytest

from serving_helpers import EXAMPLES  # noqa: F401 - puts bench/ on sys.path
from soak_serve import Soak


@pytest.mark.slow  # about 50 s on an idle 2-core machine (two server starts and 30 s of load); CI runs it
def test_soak_with_faults_and_a_restart():
    result = Soak(seconds=30, clients=6, rss_bound=256 * 2**20).run()
    assert result["problems"] == []  # no wrong answer, no unexpected status, no 5xx but the injected faults
    requests = result["requests"]
    for kind in ("valid", "stream", "disconnect", "session", "bad", "fault", "session resumed"):
        assert requests.get(kind, 0) > 0, requests
    assert requests.get("unexpected 5xx", 0) == 0
    assert result["metric_samples"] > 100 and result["kv_peak_bytes"] <= result["kv_memory"]
    assert len(result["rss_mib"]) == 2 and result["rss_growth_mib"] < 256  # one per server run: before and after the kill
    assert result["end"]["healthy"]
