"""Fuzz: video-qa annotation files and outputs: a DatasetError (one CLI line), or the right answer."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
from cli_harness import assert_one_clear_error

from dbtrimkv.video_qa import load_dataset
from dbtrimkv.video_qa.datasets import DatasetError
from dbtrimkv.video_qa.runner import load_predictions, metrics_path, run_dataset, settings_path


def _record(**extra):
    return {"question_id": "q1", "videoID": "v", "question": "what?", "options": ["A. x", "B. y"], "answer": "A",
            **extra}


BAD = {
    "too-many-options.json": json.dumps([_record(options=[f"{i}" for i in range(30)])]).encode(),
    "no-question.json": json.dumps([{k: v for k, v in _record().items() if k != "question"}]).encode(),
    "no-video.json": json.dumps([{k: v for k, v in _record().items() if k != "videoID"}]).encode(),
    "options-not-list.json": json.dumps([_record(options=5)]).encode(),
    "answer-not-option.json": json.dumps([_record(answer="Z")]).encode(),
    "answer-null.json": json.dumps([_record(answer=None)]).encode(),
    "latin1.json": '[{"question_id": "caf\xe9"}]'.encode("latin-1"),
    "malformed.json": b"[{", "object.json": b"{}", "list-of-ints.json": b"[1, 2]", "null.json": b"null",
    "nested.json": b"[" * 100000, "bad-line.jsonl": b'{"video": "v", "question": "q"}\n{oops\n',
    "duplicate.json": json.dumps([_record(), _record()]).encode(),
    "binary.json": bytes(range(256)),
    "options-string.json": json.dumps([_record(options="A. x\nB. y")]).encode(),  # not one option per character
    "videoID-null.json": json.dumps([_record(videoID=None)]).encode(),  # never the file None.mp4
    "video-null.jsonl": json.dumps({"video": None, "question": "q", "answer": "x"}).encode(),
    "video-empty.jsonl": json.dumps({"video": " ", "question": "q", "answer": "x"}).encode(),
    "video-list.jsonl": json.dumps({"video": ["v.mp4"], "question": "q", "answer": "x"}).encode(),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_annotations(tmp_path, name):
    (tmp_path / "v.mp4").write_bytes(b"")
    path = tmp_path / name
    path.write_bytes(BAD[name])
    with pytest.raises(DatasetError):
        load_dataset(path, "videomme" if name.endswith(".json") else "jsonl")


def test_null_video_and_string_options_are_named(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"video": None, "question": "q", "answer": "x"}) + "\n")
    with pytest.raises(DatasetError, match="video is null"):
        load_dataset(path, "jsonl")
    path.write_text(json.dumps(_record(options="A. x B. y")) + "\n")
    with pytest.raises(DatasetError, match="options must be a list of option texts"):
        load_dataset(path, "videomme")
    path.write_text(json.dumps({"video_name": "v.mp4", "video": None, "question": "q", "candidates": ["a", "b"],
                                "answer": "b"}) + "\n")
    assert load_dataset(path, "mlvu")[0].video.name == "v.mp4"  # a null falls through to the next name field


def test_videomme_without_question_id(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"")
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{k: v for k, v in _record().items() if k != "question_id"}]))
    (item,) = load_dataset(path, "videomme")
    assert item.id == "v-0" and item.answer == "A"


def test_26_options_are_fine(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"")
    path = tmp_path / "a.json"
    path.write_text(json.dumps([_record(options=[f"opt {i}" for i in range(26)], answer="Z")]))
    assert load_dataset(path, "videomme")[0].answer == "Z"


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    pandas = pytest.importorskip("pandas")

    def no_engine(*args, **kwargs):
        raise ImportError("Unable to find a usable engine; tried using: 'pyarrow', 'fastparquet'.")

    monkeypatch.setattr(pandas, "read_parquet", no_engine)
    path = tmp_path / "a.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(DatasetError, match="pyarrow"):
        load_dataset(path, "videomme")


class FakeAnswerer:
    def __init__(self):
        self.asked = 0

    def encode(self, video):
        return SimpleNamespace(frames=4)

    def ask(self, encoded, prompt):
        self.asked += 1
        stats = SimpleNamespace(peak_kv_entries=1, kv_storage_bytes=1, retained_entries={}, prompt_tokens={},
                                kv_entries=1, kv_entries_full=2, evictions=0)
        return SimpleNamespace(text="A", stats=stats)


@pytest.fixture
def items(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"")
    path = tmp_path / "a.json"
    path.write_text(json.dumps([_record()]))
    return load_dataset(path, "videomme")


def test_rerun_with_other_settings_is_refused(tmp_path, items):
    output = tmp_path / "out" / "preds.jsonl"
    first = {"model": "tiny-recall", "eviction": {"policy": "global", "memory_size": 16}}
    metrics = run_dataset(FakeAnswerer(), items, output, progress=False, settings=first)
    assert metrics["settings"] == first and json.loads(metrics_path(output).read_text())["settings"] == first
    assert json.loads(settings_path(output).read_text()) == first
    again = FakeAnswerer()
    run_dataset(again, items, output, progress=False, settings=first)  # same settings: resumes, nothing to do
    assert again.asked == 0
    other = {"model": "tiny-recall", "eviction": {"policy": "head", "memory_size": 16}}
    with pytest.raises(DatasetError, match="other settings .changed: eviction"):
        run_dataset(FakeAnswerer(), items, output, progress=False, settings=other)
    assert len(load_predictions(output)) == 1


def test_output_that_cannot_be_written(tmp_path, items):
    with pytest.raises(DatasetError, match="directory"):
        run_dataset(FakeAnswerer(), items, tmp_path, progress=False)
    if sys.platform.startswith("linux"):
        with pytest.raises(DatasetError, match="cannot write"):
            run_dataset(FakeAnswerer(), items, "/dev/full", progress=False)


def test_cli_dataset_errors_are_one_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(BAD["too-many-options.json"])
    (tmp_path / "v.mp4").write_bytes(b"")
    assert_one_clear_error(["video-qa", "--dataset", str(path), "--format", "videomme", "--output",
                            str(tmp_path / "p.jsonl"), "--no-progress"], "at most 26")


def test_skipping_goes_to_stderr(tmp_path, items, capsys):
    class Broken(FakeAnswerer):
        def encode(self, video):
            from dbtrimkv.errors import MediaError

            raise MediaError("cannot read video")

    run_dataset(Broken(), items, tmp_path / "p.jsonl", progress=True)
    captured = capsys.readouterr()
    assert "skipping" in captured.err and "skipping" not in captured.out


def test_cli_output_into_a_closed_pipe_is_quiet(monkeypatch):
    """`dbtrimkv chat ... | head -c0`: the write fails with BrokenPipeError; main stops quietly (status 141)."""
    import io

    from dbtrimkv import cli
    from dbtrimkv.commands import chat

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    def answer(args):
        print("an answer")
        return 0

    monkeypatch.setattr(chat, "run", answer)
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert cli.main(["chat", "q?"]) == 141
