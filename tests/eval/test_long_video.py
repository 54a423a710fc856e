"""`dbtrimkv eval long-video`: lazy synthetic videos, bounded policies vs the full cache up to its cap."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from dbtrimkv.eval.long_video import FULL, OOM, LongVideo, LongVideoSpec, parse_digit, run_one
from dbtrimkv.recall.tasks import SEGMENTS


def test_a_video_is_a_pure_function_of_its_seed_and_holds_the_digit_for_three_frames():
    video = LongVideo(seed=3, minutes=0.5, fps=2.0)
    assert video.num_frames == 60 and 0 <= video.needle <= 57 and video.hold == 3
    frames = list(video.frames())
    assert [i for i, _, _ in frames] == list(range(60)) and {fps for _, _, fps in frames} == {2.0}
    assert all(np.array_equal(frame, video.frame(i)) for i, frame, _ in frames)  # redrawn identically, lazily
    assert not np.array_equal(video.frame(0), LongVideo(seed=4, minutes=0.5, fps=2.0).frame(0))
    # the digit frame is the only one drawn with the digit's segments: rebuild it from draw_digit's rng
    import random

    from dbtrimkv.recall.tasks import draw_digit

    rng = random.Random(f"frame:3:{video.needle}")
    assert np.array_equal(video.frame(video.needle), np.asarray(draw_digit(video.digit, 32, rng)[0]))
    held = [i for i in range(60) if np.array_equal(video.frame(i), video.frame(video.needle))]
    assert held == [video.needle, video.needle + 1, video.needle + 2]  # one still image for three frames
    assert video.digit in SEGMENTS


def test_frames_are_generated_one_at_a_time():
    frames = LongVideo(seed=0, minutes=60, fps=2.0).frames()  # 7,200 frames: nothing drawn until asked
    first = next(frames)
    assert first[0] == 0 and first[1].shape == (32, 32, 3)


def test_parse_digit_reads_the_answer_after_the_prefix():
    assert parse_digit("video:7") == "7" and parse_digit("video: 3 or 4") == "3" and parse_digit("video:") is None


@pytest.fixture(scope="module")
def shipped():
    import dbtrimkv

    return dbtrimkv.load_model()


def test_bounded_policies_keep_memory_flat_and_the_full_cache_stops_at_its_cap(shipped):
    model, processor = shipped
    spec = LongVideoSpec(memory_size=8, window_frames=8, full_cache_cap_mb=1.0)
    # 2 and 4 minutes at 1 fps: timestamps of three digits in both (a window's tokens grow with the digits
    # of its `<t seconds>` stamps, and the peak with the window: flat from 100 s to 999 s, then one step)
    bounded = [run_one(model, processor, LongVideo(0, minutes), "global", spec) for minutes in (2, 4)]
    assert all(r["status"] == "ok" for r in bounded)
    assert bounded[0]["kv_bytes"] == bounded[1]["kv_bytes"]  # the same pool for twice the video
    assert bounded[0]["peak_entries"] == bounded[1]["peak_entries"]
    assert bounded[1]["prompt_tokens"] > 1.9 * bounded[0]["prompt_tokens"]
    full = [run_one(model, processor, LongVideo(0, minutes), FULL, spec) for minutes in (0.25, 2)]
    assert full[0]["status"] == "ok" and full[0]["peak_entries"] > bounded[0]["peak_entries"]
    assert full[1]["status"] == OOM and full[1]["kv_bytes"] > 2**20  # stopped just past the cap


def _fake_runs(monkeypatch, out_of_memory) -> list:
    """Stand in for `run_one` (and the model load): records (policy, minutes, seed, timeline) per
    call, answers every video right, and reports the full cache out of memory where
    `out_of_memory(video)` says so."""
    from dbtrimkv.eval import long_video

    calls = []

    def fake_run_one(model, processor, video, policy, spec, timeline=None):
        calls.append((policy, video.minutes, video.seed, timeline))
        if policy == FULL and out_of_memory(video):
            return {"status": OOM, "kv_bytes": 1, "rss_bytes": 1}
        return {"status": "ok", "answer": "video:1", "correct": True, "kv_bytes": 1, "rss_bytes": 1,
                "peak_entries": 1, "prompt_tokens": 1, "seconds": 1.0, "cpu_seconds": 1.0}

    monkeypatch.setattr(long_video, "run_one", fake_run_one)
    monkeypatch.setattr(long_video.checkpoints, "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(long_video, "gates_are_trained", lambda model: True)
    return calls


def test_the_full_cache_runs_after_every_bounded_policy_and_stops_at_its_first_oom(monkeypatch):
    # the full cache's allocations stay in the process's resident memory: run it last, so the bounded
    # policies' peak RSS is their own; cells still come out by length, then policy
    from dbtrimkv.eval import long_video

    recorded = _fake_runs(monkeypatch, lambda video: video.minutes >= 2)
    spec = LongVideoSpec(minutes=[1, 2, 3], examples=2, policies=["global", "h2o"])
    results = long_video.run_long_video(spec)
    calls = [call[:3] for call in recorded]
    first_full = next(i for i, call in enumerate(calls) if call[0] == FULL)
    assert {call[0] for call in calls[:first_full]} == {"global", "h2o"} and len(calls[:first_full]) == 12
    assert calls[first_full:] == [(FULL, 1, 0), (FULL, 1, 1), (FULL, 2, 0)]  # one OOM stops it for good
    assert [(c["minutes"], c["policy"]) for c in results["results"]] == [
        (m, p) for m in (1, 2, 3) for p in ("global", "h2o", FULL)]
    assert [c["status"] for c in results["results"] if c["policy"] == FULL] == ["ok", OOM, OOM]


def test_the_command_writes_json_markdown_and_plots(tmp_path, monkeypatch):
    from dbtrimkv.cli import main

    out = tmp_path / "lv"
    argv = ["eval", "long-video", "--minutes", "0.2", "0.5", "--examples", "1", "--policies", "global", "streaming",
            "--memory-size", "8", "--window-frames", "8", "--full-cache-cap-mb", "0.3", "--output", str(out),
            "--timeline-minutes", "0.5"]
    monkeypatch.setattr(sys, "argv", ["dbtrimkv", *argv])
    assert main(argv) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    cells = {(c["minutes"], c["policy"]): c for c in data["results"]}
    assert set(cells) == {(m, p) for m in (0.2, 0.5) for p in ("global", "streaming", FULL)}
    assert cells[(0.2, FULL)]["status"] == "ok" and cells[(0.5, FULL)]["status"] == OOM
    assert 0.0 <= cells[(0.5, "global")]["accuracy"] <= 1.0 and cells[(0.5, "global")]["seconds_per_minute"] > 0
    assert 0 < cells[(0.5, "global")]["cpu_seconds_per_minute"]
    table = out.with_suffix(".md").read_text()
    assert "| 0.5 | " in table and "OOM" in table and data["command"].startswith("dbtrimkv eval long-video")
    import transformers  # the video layout depends on the release: the table names it

    assert data["transformers"] == transformers.__version__ and f"transformers {transformers.__version__})" in table
    from PIL import Image

    assert Image.open(out.with_suffix(".png")).size[0] > 800
    assert Image.open(tmp_path / "lv-timeline.png").format == "PNG"


def test_bad_arguments_are_one_clear_error(capsys):
    from dbtrimkv.cli import main

    assert main(["eval", "long-video", "--minutes", "0"]) == 2
    assert "--minutes" in capsys.readouterr().err


def test_first_seed_picks_held_out_videos_and_the_table_says_so(monkeypatch):
    # tuning on the benchmark's own videos (seeds 0..N-1) would overfit it: --first-seed gives others
    from dbtrimkv.eval import long_video, long_video_report

    calls = _fake_runs(monkeypatch, lambda video: True)
    spec = LongVideoSpec(minutes=[1], examples=3, policies=["global"], first_seed=1000, timeline_minutes=1)
    results = long_video.run_long_video(spec, timeline_path="t.png")
    assert [(policy, seed, timeline) for policy, _, seed, timeline in calls] == [
        ("global", 1000, "t.png"), ("global", 1001, None), ("global", 1002, None), (FULL, 1000, None)]
    assert "(seeds 1000-1002, not the benchmark's 0-2)" in long_video_report.markdown(results, "cmd", "x.png")
    benchmark = long_video.run_long_video(LongVideoSpec(minutes=[1], examples=2, policies=["global"]))
    assert "seeds" not in long_video_report.markdown(benchmark, "cmd", "x.png").split("Prompt tokens")[0]
    assert [seed for _, _, seed, _ in calls[4:]] == [0, 1, 0]


def test_a_negative_first_seed_is_one_clear_error(capsys):
    from dbtrimkv.cli import main

    assert main(["eval", "long-video", "--first-seed", "-1"]) == 2
    assert "--first-seed" in capsys.readouterr().err


def test_the_retention_calibration_reaches_the_bounded_policies(monkeypatch):
    from dbtrimkv.eval import long_video

    seen = []

    class Stop(Exception):
        pass

    def fake_encode(model, processor, windows, config, **kwargs):
        seen.append(config)
        raise Stop

    monkeypatch.setattr(long_video, "encode_windows", fake_encode)
    monkeypatch.setattr(long_video, "frame_windows", lambda *args, **kwargs: iter(()))
    spec = LongVideoSpec(memory_size=8, calibration={"video_decay_scale": 0.1, "decay_floor": 0.003})
    for policy in ("global", FULL):
        with pytest.raises(Stop):
            run_one(None, None, LongVideo(0, 0.1), policy, spec)
    assert (seen[0].policy, seen[0].memory_size, seen[0].video_decay_scale, seen[0].decay_floor) == ("global", 8, 0.1, 0.003)
    assert seen[1].unbounded and (seen[1].video_decay_scale, seen[1].decay_floor) == (1.0, 0.0)


@pytest.mark.parametrize("flag, value", [("--video-decay-scale", "0"), ("--video-decay-scale", "2"),
                                         ("--decay-floor", "-0.5")])
def test_a_bad_calibration_is_one_clear_error_before_the_model_loads(flag, value, capsys, monkeypatch):
    from dbtrimkv.cli import main
    from dbtrimkv.loading import checkpoints

    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as exit_info:  # argparse's own exit, status 2
        main(["eval", "long-video", "--minutes", "1", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and flag in err
