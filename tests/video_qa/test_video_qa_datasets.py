"""Annotation loaders, answer parsing, and the resumable dataset runner (fake and real answerers)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import dbtrimkv
from dbtrimkv.errors import MediaError
from dbtrimkv.video_qa import DatasetError, StreamOptions, VideoQA, load_dataset, parse_choice, run_dataset
from dbtrimkv.video_qa.answers import matches_open_answer, split_option
from dbtrimkv.video_qa.runner import load_predictions, metrics_path, score

OPTIONS = ["a red car", "a car", "a dog", "two cats"]


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("B.", "B"), ("(C) a dog", "C"), ("**D**", "D"), ("The answer is C.", "C"), ("Answer: (B)", "B"),
    ("the correct answer is option D", "D"), ("I think it is a red car.", "A"), ("It shows two cats", "D"),
    ("A", "A"), ("A man walks in", None), ("Bob", None), ("E", None), ("nothing fits", None),
])
def test_parse_choice(text, letter):
    assert parse_choice(text, OPTIONS) == letter


def test_open_answers_and_option_splitting():
    assert matches_open_answer("It is a Red car!", "red car") and not matches_open_answer("a redcar", "red car")
    assert not matches_open_answer("anything", "")
    assert split_option("B. a dog") == ("B", "a dog") and split_option("(C) cats") == ("C", "cats")
    assert split_option("a dog") == (None, "a dog")


def _write_json(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_videomme_records(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "fFjv93ACGo8.mkv").write_bytes(b"")
    path = _write_json(tmp_path / "videomme.json", [
        {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
         "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
         "task_type": "Counting Problem", "question": "How many?", "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."],
         "answer": "C"},
        {"video_id": "002", "duration": "long", "videoID": "abc", "question_id": "002-1", "task_type": "OCR",
         "question": "What?", "options": ["A. x", "B. y"], "answer": "B"},
    ])
    first, second = load_dataset(path, "videomme", tmp_path / "videos")
    assert first.id == "001-1" and first.video == tmp_path / "videos" / "fFjv93ACGo8.mkv"  # found by stem
    assert first.options == ["1.", "2.", "3.", "4."] and first.answer == "C"
    assert first.tags == {"duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
                          "task_type": "Counting Problem"}
    assert second.video == tmp_path / "videos" / "abc.mp4"  # missing: the default name, an error at run time
    assert first.prompt() == ("How many?\nA. 1.\nB. 2.\nC. 3.\nD. 4.\n"
                              "Answer with the option's letter from the given choices directly.")


def test_mlvu_records_and_layout(tmp_path):
    (tmp_path / "video" / "1_plotQA").mkdir(parents=True)
    (tmp_path / "video" / "1_plotQA" / "movie.mp4").write_bytes(b"")
    path = _write_json(tmp_path / "json" / "1_plotQA.json", [
        {"video": "movie.mp4", "duration": 420.5, "question": "Who drives?", "candidates": ["the cat", "the dog"],
         "answer": "the dog", "question_type": "plotQA"},
        {"video": "movie.mp4", "question": "Which color?", "candidates": ["red", "blue", "green"], "answer": "red"},
    ])
    first, second = load_dataset(path, "mlvu", tmp_path / "video")
    assert first.id == "1_plotQA/0" and second.id == "1_plotQA/1"
    assert first.video == tmp_path / "video" / "1_plotQA" / "movie.mp4"
    assert first.options == ["the cat", "the dog"] and first.answer == "B" and second.answer == "A"
    assert first.tags == {"duration": "420.5", "question_type": "plotQA"}
    assert second.tags == {"question_type": "1_plotQA"}  # the task comes from the file name when unnamed


def test_jsonl_records(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", [
        {"video": "a.mp4", "question": "What is shown?", "answer": "a red car"},
        {"id": "q2", "video": "/abs/b.mp4", "question": "Pick one", "options": ["cat", "dog"], "answer": "dog"},
        {"video": "a.mp4", "question": "No gold answer"},
    ])
    first, second, third = load_dataset(path, "jsonl")
    assert (first.id, first.video, first.options, first.answer) == ("0", tmp_path / "a.mp4", [], "a red car")
    assert (second.id, second.video, second.answer) == ("q2", Path("/abs/b.mp4"), "B")
    assert third.answer is None and third.prompt() == "No gold answer"


@pytest.mark.parametrize("records, fmt, message", [
    ([{"video": "a", "question": "q", "answer": "x", "id": 1}, {"video": "b", "question": "q", "id": 1}], "jsonl",
     "appears twice"),
    ([{"video": "a"}], "jsonl", "not a valid jsonl record"),
    ([{"videoID": "a", "question_id": "1", "question": "q", "options": ["A. x"], "answer": "D"}], "videomme",
     "not a valid videomme record"),
    ([{"video": "a", "question": "q"}], "youtube", "unknown dataset format"),
])
def test_bad_annotations_give_clear_errors(tmp_path, records, fmt, message):
    with pytest.raises(DatasetError, match=message):
        load_dataset(_write_jsonl(tmp_path / "bad.jsonl", records), fmt)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "none.json", "mlvu")


class FakeAnswerer:
    """Answers from a script; records which videos it encoded; can be interrupted after n answers."""

    def __init__(self, answers: dict[str, str], stop_after: int | None = None):
        self.answers, self.stop_after = answers, stop_after
        self.encoded, self.asked = [], []

    def encode(self, path):
        if not Path(path).exists():
            raise MediaError(f"video not found: {path}")
        self.encoded.append(Path(path).name)
        return SimpleNamespace(frames=4)

    def ask(self, encoded, prompt):
        if self.stop_after is not None and len(self.asked) == self.stop_after:
            raise KeyboardInterrupt
        self.asked.append(prompt)
        stats = SimpleNamespace(peak_kv_entries=10, kv_storage_bytes=100, kv_entries=8, kv_entries_full=20,
                                retained_entries={"text": 4, "image": 0, "video": 4}, evictions=1,
                                prompt_tokens={"text": 5, "image": 0, "video": 9})
        return SimpleNamespace(text=self.answers[prompt.splitlines()[0]], stats=stats)


@pytest.fixture
def mc_dataset(tmp_path):
    for name in ("v1.mp4", "v2.mp4"):
        (tmp_path / name).write_bytes(b"")
    records = [
        {"video": "v1.mp4", "question": "q1", "options": OPTIONS, "answer": "B", "task_type": "t1"},
        {"video": "v2.mp4", "question": "q2", "options": OPTIONS, "answer": "C", "task_type": "t1"},
        {"video": "v1.mp4", "question": "q3", "options": OPTIONS, "answer": "two cats", "task_type": "t2"},
        {"video": "v2.mp4", "question": "q4", "options": OPTIONS, "answer": "A", "task_type": "t2"},
        {"video": "v1.mp4", "question": "q5", "answer": "a dog"},
    ]
    return load_dataset(_write_jsonl(tmp_path / "qa.jsonl", records), "jsonl")


ANSWERS = {"q1": "The answer is B.", "q2": "It is a dog", "q3": "(A)", "q4": "I cannot tell", "q5": "I saw a dog."}


def test_runner_scores_groups_by_video_and_writes_metrics(mc_dataset, tmp_path):
    output = tmp_path / "out" / "preds.jsonl"
    fake = FakeAnswerer(ANSWERS)
    metrics = run_dataset(fake, mc_dataset, output, progress=False)
    assert fake.encoded == ["v1.mp4", "v2.mp4"]  # once per video, questions grouped
    assert [p.splitlines()[0] for p in fake.asked] == ["q1", "q3", "q5", "q2", "q4"]
    records = load_predictions(output)
    assert {i: (r["parsed"], r["correct"]) for i, r in records.items()} == {
        "0": ("B", True), "1": ("C", True), "2": ("A", False), "3": (None, False), "4": ("I saw a dog.", True)}
    assert records["0"]["kv"]["peak_entries"] == 10 and records["0"]["frames"] == 4
    assert (metrics["correct"], metrics["total"], metrics["unparsed"], metrics["errors"]) == (3, 5, 1, 0)
    assert metrics["accuracy"] == pytest.approx(0.6)
    assert metrics["by_tag"]["task_type"]["t1"]["accuracy"] == 1.0
    assert metrics["by_tag"]["task_type"]["t2"]["accuracy"] == 0.0
    assert json.loads(metrics_path(output).read_text()) == metrics


def test_runner_resumes_after_an_interruption(mc_dataset, tmp_path):
    output = tmp_path / "preds.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_dataset(FakeAnswerer(ANSWERS, stop_after=2), mc_dataset, output, progress=False)
    assert list(load_predictions(output)) == ["0", "2"]
    with output.open("a") as f:
        f.write('{"id": "4", "predic')  # a line cut off by the interruption
    resumed = FakeAnswerer(ANSWERS)
    metrics = run_dataset(resumed, mc_dataset, output, progress=False)
    assert [p.splitlines()[0] for p in resumed.asked] == ["q2", "q4", "q5"]  # done ids skipped, by video
    lines = output.read_text().splitlines()
    assert len(lines) == 5 and sorted(json.loads(line)["id"] for line in lines) == ["0", "1", "2", "3", "4"]
    assert metrics["correct"] == 3 and metrics["total"] == 5
    again = FakeAnswerer(ANSWERS)
    run_dataset(again, mc_dataset, output, progress=False)
    assert again.asked == [] and again.encoded == []


def test_unreadable_videos_are_recorded_and_retried(mc_dataset, tmp_path):
    (tmp_path / "v2.mp4").unlink()
    output = tmp_path / "preds.jsonl"
    metrics = run_dataset(FakeAnswerer(ANSWERS), mc_dataset, output, progress=False)
    records = load_predictions(output)
    assert "video not found" in records["1"]["error"] and records["1"]["correct"] is None
    # the two questions on the missing video are errors, not wrong answers: accuracy is over the 3 answered
    assert (metrics["errors"], metrics["total"], metrics["answered"], metrics["correct"]) == (2, 3, 3, 2)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    (tmp_path / "v2.mp4").write_bytes(b"")
    retry = FakeAnswerer(ANSWERS)
    metrics = run_dataset(retry, mc_dataset, output, progress=False)
    assert retry.encoded == ["v2.mp4"] and metrics["errors"] == 0 and metrics["correct"] == 3


def test_a_corrupt_middle_line_is_reported(mc_dataset, tmp_path):
    output = tmp_path / "preds.jsonl"
    output.write_text('{"id": "0"}\nnot json\n')
    with pytest.raises(DatasetError, match=":2: not a prediction record"):
        run_dataset(FakeAnswerer(ANSWERS), mc_dataset, output, progress=False)


def test_score_without_gold_answer(mc_dataset):
    item = mc_dataset[0]
    item.answer = None
    assert score(item, "B") == ("B", None)


def test_runner_end_to_end_on_the_tiny_model(gated, clips, tmp_path):
    model, processor = gated
    videos = [clips(6, seed=1), clips(8, seed=2)]
    records = [{"video": str(videos[0]), "question": "What is shown?", "options": ["a cat", "a dog"], "answer": "A"},
               {"video": str(videos[1]), "question": "Describe it.", "answer": "noise"},
               {"video": str(videos[0]), "question": "Anything else?", "answer": "noise"}]
    items = load_dataset(_write_jsonl(tmp_path / "qa.jsonl", records), "jsonl")
    encodes = []
    hook = model.model.visual.register_forward_hook(lambda *a: encodes.append(1))
    qa = VideoQA(model, processor, dbtrimkv.DBTrimKVConfig(budget=48, buffer_size=4, prefill_chunk=8),
                 StreamOptions(fps=8, window_frames=4), max_new_tokens=3)
    try:
        metrics = run_dataset(qa, items, tmp_path / "preds.jsonl", progress=False)
        calls_per_run = len(encodes)
        run_dataset(qa, items, tmp_path / "preds.jsonl", progress=False)  # resumed: nothing left to do
    finally:
        hook.remove()
    assert len(encodes) == calls_per_run  # the rerun encoded nothing
    predictions = load_predictions(tmp_path / "preds.jsonl")
    assert len(predictions) == 3 and all(isinstance(r["prediction"], str) for r in predictions.values())
    kv = predictions["0"]["kv"]
    assert kv["peak_entries"] <= 48 + 3 * 2 * 8 and kv["kept_by_modality"]["video"] >= 0
    assert kv["prompt_tokens"]["video"] > 0 and predictions["0"]["frames"] == 6
    assert metrics["total"] == 3 and metrics["missing"] == 0 and 0 <= metrics["correct"] <= 3
