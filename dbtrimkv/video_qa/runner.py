"""Run a video QA dataset: each video encoded once, predictions appended as they come, resumable.

Why: a benchmark of long videos takes hours, so an interruption must not lose work. Every answer
is appended to the predictions JSONL (flushed) as soon as it exists; a rerun skips the ids already
there. A line cut off by the interruption is dropped and the file repaired before appending.
Questions are grouped by video, so each video is decoded and prefilled once and its compressed
cache is forked per question. A video that cannot be read gets an `error` record for each of its
questions (counted as wrong, retried on the next run) instead of stopping the run.

Accuracy is computed over the dataset's ids from the predictions file, overall and per tag value
(e.g. Video-MME `duration`, MLVU `question_type`), and written next to the predictions as
`<name>.metrics.json`.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from ..errors import MediaError
from .answers import matches_open_answer, parse_choice
from .datasets import DatasetError, QAItem


def load_predictions(path: str | Path) -> dict[str, dict]:
    """Records of a predictions file by id (a later record of an id replaces an earlier one).

    A last line without its newline was cut off mid-write: it is removed from the file.
    """
    path = Path(path)
    if not path.is_file():  # nothing yet, or a device such as /dev/null (never read: /dev/zero is endless)
        return {}
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read the predictions file {path}: {exc}") from None
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        path.write_text(text, encoding="utf-8")
    records = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[str(record["id"])] = record
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DatasetError(f"{path}:{number}: not a prediction record (a JSON object with an id); "
                               "fix or remove the line to resume") from None
    return records


def score(item: QAItem, prediction: str) -> tuple[str | None, bool | None]:
    """(parsed answer, correct?): the option letter for multiple choice, the stripped text otherwise;
    `correct` is None when the item has no gold answer."""
    if item.options:
        parsed = parse_choice(prediction, item.options)
        return parsed, None if item.answer is None else parsed == item.answer
    parsed = prediction.strip()
    return parsed, None if item.answer is None else matches_open_answer(parsed, item.answer)


def _record(item: QAItem, **fields) -> dict:
    return {"id": item.id, "video": str(item.video), "question": item.question, "options": item.options,
            "answer": item.answer, "tags": item.tags, **fields}


def _answer_record(item: QAItem, encoded, answer) -> dict:
    parsed, correct = score(item, answer.text)
    s = answer.stats
    return _record(item, prediction=answer.text, parsed=parsed, correct=correct, frames=encoded.frames, kv={
        "peak_entries": s.peak_kv_entries, "storage_bytes": s.kv_storage_bytes, "entries": s.kv_entries,
        "entries_full": s.kv_entries_full, "kept_by_modality": s.retained_entries, "evictions": s.evictions,
        "prompt_tokens": s.prompt_tokens,
    })


def run_dataset(answerer, items: list[QAItem], output: str | Path, progress: bool = True,
                settings: dict | None = None) -> dict:
    """Answer every item not yet in `output` (JSONL, appended), then write and return the metrics.

    `answerer` has `encode(video_path)` and `ask(encoded, prompt)` (a `VideoQA`). `settings` (model,
    eviction, sampling, ...) are recorded next to the predictions and in the metrics; resuming an
    output made with other settings is refused (its answers would be mixed with these).
    """
    output = Path(output)
    try:
        return _run(answerer, items, output, progress, settings)
    except OSError as exc:
        raise DatasetError(f"cannot write the predictions to {output}: {exc.strerror or exc}") from None


def settings_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.stem + ".settings.json")


def _check_settings(output: Path, settings: dict | None) -> None:
    if settings is None or (output.exists() and not output.is_file()):  # a device: nothing to resume
        return
    path = settings_path(output)
    if path.exists():
        try:
            before = json.loads(path.read_bytes().decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{path} is not valid JSON ({exc}); delete it with {output} to start over") from None
        if before != settings:
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            raise DatasetError(f"{output} holds answers made with other settings (changed: {', '.join(changed)}); "
                               f"pass another --output, or delete {output} and {path.name} to start over")
    elif output.exists() and output.stat().st_size:
        raise DatasetError(f"{output} holds answers whose settings were not recorded; pass another --output, "
                           "or delete it to start over")
    else:
        path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _run(answerer, items: list[QAItem], output: Path, progress: bool, settings: dict | None) -> dict:
    from tqdm.auto import tqdm

    if output.is_dir():
        raise DatasetError(f"--output {output} is a directory; give a file name such as {output / 'preds.jsonl'}")
    output.parent.mkdir(parents=True, exist_ok=True)
    done = load_predictions(output)
    _check_settings(output, settings)
    todo = [item for item in items if item.id not in done or "error" in done[item.id]]
    by_video: dict[Path, list[QAItem]] = defaultdict(list)
    for item in todo:
        by_video[item.video].append(item)
    with output.open("a", encoding="utf-8") as out, \
            tqdm(total=len(items), initial=len(items) - len(todo), unit="question", disable=not progress) as bar:
        def write(record: dict) -> None:
            out.write(json.dumps(record) + "\n")
            out.flush()
            bar.update()

        for video, group in by_video.items():
            try:
                encoded = answerer.encode(video)
            except MediaError as exc:
                bar.write(f"skipping {video}: {exc}", file=sys.stderr)
                for item in group:
                    write(_record(item, error=str(exc), correct=None))  # not answered: not in the accuracy
                continue
            for item in group:
                write(_answer_record(item, encoded, answerer.ask(encoded, item.prompt())))
            del encoded  # one video cache alive at a time
    metrics = accuracy(items, load_predictions(output))
    if settings is not None:
        metrics["settings"] = settings
    metrics_path(output).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def metrics_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.stem + ".metrics.json")


def accuracy(items: list[QAItem], records: dict[str, dict]) -> dict:
    """Accuracy over the items that have a gold answer and an answer, overall and per tag value; items whose
    video failed (records with an error) are counted in `errors`, not as wrong answers."""
    overall = {"correct": 0, "total": 0}
    by_tag: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: {"correct": 0, "total": 0}))
    unparsed = errors = missing = 0
    for item in items:
        record = records.get(item.id)
        if record is None:
            missing += 1
            continue
        if "error" in record:
            errors += 1
            continue
        unparsed += bool(item.options) and record.get("parsed") is None
        if record.get("correct") is None:
            continue
        for counts in (overall, *(by_tag[k][v] for k, v in item.tags.items())):
            counts["total"] += 1
            counts["correct"] += bool(record["correct"])

    def rate(counts):
        return dict(counts, accuracy=counts["correct"] / counts["total"] if counts["total"] else None)

    return {**rate(overall), "answered": len(items) - missing - errors, "missing": missing, "errors": errors,
            "unparsed": unparsed,
            "by_tag": {k: {v: rate(c) for v, c in values.items()} for k, values in by_tag.items()}}
