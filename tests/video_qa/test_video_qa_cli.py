"""`dbtrimkv video-qa` (in process) and the `demos/video_qa.py` script entry."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from dbtrimkv import cli
from dbtrimkv.video_qa.runner import metrics_path

ROOT = Path(__file__).resolve().parents[2]
BUDGET = ["--budget", "48", "--buffer-size", "4", "--prefill-chunk", "8", "--fps", "8", "--window-frames", "4",
          "--max-new-tokens", "3", "--no-progress"]


def test_video_qa_is_a_command():
    assert "video-qa" in cli.COMMANDS


def test_single_video_with_two_questions(clips, capsys):
    assert cli.main(["video-qa", "--video", str(clips(8)), *BUDGET, "What happens?", "Is it dark?"]) == 0
    out, err = capsys.readouterr()
    assert out.count("Q: ") == 2 and out.count("A: ") == 2
    assert "Q: What happens?" in out and "Q: Is it dark?" in out
    assert "video: 8 frames in 4 frame groups" in err
    assert err.count("peak KV entries: 96 |") == 2  # budget + layers x heads x chunk = 48 + 6 * 8
    assert err.count("kept by modality: text") == 2 and "KV storage:" in err


def test_dataset_run_and_resume(clips, tmp_path, capsys):
    video = clips(6, seed=3)
    folder = tmp_path / "json"
    folder.mkdir()
    (folder / "4_count.json").write_text(json.dumps([
        {"video": video.name, "question": "How many?", "candidates": ["1", "2"], "answer": "2",
         "question_type": "count"},
        {"video": video.name, "question": "How many more?", "candidates": ["3", "4"], "answer": "3"},
    ]))
    output = tmp_path / "preds.jsonl"
    args = ["video-qa", "--dataset", str(folder / "4_count.json"), "--format", "mlvu", "--video-dir", str(video.parent),
            "--output", str(output), *BUDGET]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert out.startswith("accuracy: ") and "(" in out and "/2)" in out and str(metrics_path(output)) in out
    assert "KV: peak entries 96" in err
    assert len(output.read_text().splitlines()) == 2 and metrics_path(output).exists()
    assert cli.main(args) == 0  # resumed: both ids done, nothing appended
    assert len(output.read_text().splitlines()) == 2


def test_dataset_missing_video_is_an_error_not_a_wrong_answer(clips, tmp_path, capsys):
    video = clips(6, seed=3)
    records = [{"video": str(video), "question": "How many?", "options": ["1", "2"], "answer": "A"},
               {"video": str(video), "question": "How many more?", "options": ["3", "4"], "answer": "B"},
               {"video": str(tmp_path / "gone.mp4"), "question": "Which?", "options": ["5", "6"], "answer": "A"}]
    dataset = tmp_path / "qa.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records))
    output = tmp_path / "preds.jsonl"
    assert cli.main(["video-qa", "--dataset", str(dataset), "--format", "jsonl", "--output", str(output), *BUDGET]) == 0
    out, err = capsys.readouterr()
    assert "/2) |" in out and "errors: 1 (videos that failed: not in the accuracy)" in out and "gone.mp4" in err
    metrics = json.loads(metrics_path(output).read_text())
    assert (metrics["total"], metrics["answered"], metrics["errors"]) == (2, 2, 1)


@pytest.mark.parametrize("args, message", [
    ([], "either --video"),
    (["--video", "x.mp4"], "at least one question"),
    (["--dataset", "qa.jsonl", "--output", "p.jsonl"], "--format and --output"),
    (["--video", "MISSING.mp4", "q?"], "video not found"),
    (["--dataset", "MISSING.jsonl", "--format", "jsonl", "--output", "p.jsonl"], "annotation file not found"),
    (["--video", "x.mp4", "--window-frames", "0", "q?"], "window_frames"),
])
def test_bad_input_gives_one_clear_line(tmp_path, capsys, args, message):
    args = [str(tmp_path / a) if a.startswith("MISSING") else a for a in args]
    assert cli.main(["video-qa", *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("dbtrimkv: error:")]
    assert len(errors) == 1 and message in errors[0], err


def test_demo_script_is_the_command(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["video_qa.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "demos" / "video_qa.py"), run_name="__main__")
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--video", "--dataset", "--format", "--video-dir", "--output", "--fps", "--max-frames",
                   "--window-frames", "--frame-tokens", "--budget", "--prefill-chunk", "--model", "videomme", "mlvu"):
        assert option in help_text
