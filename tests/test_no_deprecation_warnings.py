"""No FutureWarning / DeprecationWarning from dbtrimkv's own call sites, on whichever transformers is installed.

Why: transformers 5.24 renamed the cache keyword and warns on every call that uses the old name; a
library that calls it that way floods its users with warnings (and breaks at 5.40). The user flows
(import, chat, video-qa, eval, training) run in a fresh interpreter, so once-only warnings and
transformers' `warning_once` log lines cannot have been spent by earlier tests. Every such warning
raised while a dbtrimkv frame is on the stack is an error, as is a transformers log line saying that
something we passed is deprecated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FLOWS = textwrap.dedent(
    r'''
    import json, logging, sys, tempfile, traceback, warnings
    from pathlib import Path

    import dbtrimkv, dbtrimkv.demos, dbtrimkv.kernels

    OURS = tuple(str(Path(m.__file__).parent) + "/" for m in (dbtrimkv, dbtrimkv.kernels, dbtrimkv.demos))
    offences = []

    def record(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, (DeprecationWarning, FutureWarning)):
            return
        ours = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(OURS)]
        if ours:
            offences.append(f"{category.__name__}: {message} (dbtrimkv frame {ours[-1].filename}:{ours[-1].lineno})")

    class DeprecationLog(logging.Handler):
        def emit(self, rec):
            if "deprecated" in rec.getMessage().lower():
                offences.append(f"log {rec.name}: {rec.getMessage()}")

    logging.getLogger("transformers").addHandler(DeprecationLog())
    warnings.simplefilter("always")
    warnings.showwarning = record

    flow = sys.argv[1]
    ran = []
    if flow == "canary":  # the detector itself: a warning raised from a dbtrimkv frame must be caught
        exec(compile("import warnings; warnings.warn('canary', FutureWarning)", OURS[0] + "canary.py", "exec"))
    else:
        from dbtrimkv import cli
        import av, numpy as np
        tmp = Path(tempfile.mkdtemp())
        clip = tmp / "clip.mp4"
        with av.open(str(clip), "w") as container:
            stream = container.add_stream("mpeg4", rate=4)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            for i in range(8):
                frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 30 * i, np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        commands = {
            "chat": ["chat", "which digit is in the image?", "--image", "demos/examples/digit-911.png"],
            "video-qa": ["video-qa", "--video", str(clip), "--budget", "48", "--buffer-size", "4", "--prefill-chunk",
                         "8", "--fps", "4", "--window-frames", "4", "--max-new-tokens", "3", "--no-progress", "What?"],
            "eval": ["eval", "synthetic", "--examples", "2", "--num-cards", "2", "--filler", "4", "--policies",
                     "global", "--budgets", "0.5", "--output", str(tmp / "recall")],
            "train": ["train", "--config", "configs/train-tiny.yaml", "--output", str(tmp / "run"), "--max-steps", "2"],
        }
        for name, args in commands.items():
            status = cli.main(args)
            ran.append((name, status))
    print("RESULT " + json.dumps({"offences": offences, "ran": ran}))
    '''
)


def _run(flow: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="")
    result = subprocess.run([sys.executable, "-c", FLOWS, flow], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_the_detector_catches_a_warning_from_a_dbtrimkv_frame():
    assert any("canary" in offence for offence in _run("canary")["offences"])


def test_user_flows_raise_no_deprecation_warnings_from_dbtrimkv():
    result = _run("flows")
    assert result["ran"] == [["chat", 0], ["video-qa", 0], ["eval", 0], ["train", 0]]
    assert result["offences"] == []
