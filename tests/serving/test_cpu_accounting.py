"""`soak_serve.tree_cpu_seconds`, which the serving benchmark reads before and after a run to say what the run
cost the server: it must count the CPU of processes under the server (an engine process), not only its own."""

import os
import subprocess
import sys
import time

from serving_helpers import EXAMPLES  # noqa: F401 - puts bench/ on sys.path
from soak_serve import tree_cpu_seconds

BURN = "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass\nprint('done', flush=True)\ninput()"


def test_a_child_process_cpu_is_counted():
    before = tree_cpu_seconds(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", BURN.format(s=0.6)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"  # the child burnt its CPU and is still alive
        spent = tree_cpu_seconds(os.getpid()) - before
        own = tree_cpu_seconds(child.pid)
    finally:
        child.communicate("\n", timeout=30)
    assert own >= 0.5
    assert spent >= 0.5  # the parent's tree includes the child


def test_a_process_alone_counts_its_own_time():
    start = tree_cpu_seconds(os.getpid())
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    assert tree_cpu_seconds(os.getpid()) - start >= 0.25
