"""Load video QA annotations from local files into one record type.

Why: benchmarks publish the same kind of data under different field names. Each loader maps its
format onto `QAItem` (a unique id, a video path, the question, the option texts, the gold answer
as an option letter or free text, and tags to break accuracy down by):

- `videomme` (Video-MME, lmms-lab/Video-MME): `question_id`, `videoID` (the file stem; the video
  is `<video-dir>/<videoID>.mp4`), `question`, `options` (`["A. ...", "B. ...", ...]`), `answer`
  (a letter); tags `duration`, `domain`, `sub_category`, `task_type`.
- `mlvu` (MLVU, JUNJIE99/MLVU): one JSON list per task with `video`, `question`, `candidates`
  (option texts), `answer` (the text of the right candidate), `question_type`; videos are found
  in `<video-dir>/<video>` or `<video-dir>/<annotation file stem>/<video>` (the released layout,
  e.g. `json/1_plotQA.json` next to `video/1_plotQA/`). Ids are `question_id` when present, else
  `<annotation stem>/<position>`.
- `jsonl`: `{"video": path, "question": ..., "answer": ...}` per line, with optional `id`
  (default: the line number) and `options` (then the answer is a letter or an option's text).

Annotation files may be JSON (a list of records), JSONL, or Parquet (needs pandas). Relative
video paths resolve against `video_dir`, by default the annotation file's folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DBTrimKVError
from ..inputs.text_files import read_utf8
from .answers import LETTERS, format_options, split_option

FORMATS = ("videomme", "mlvu", "jsonl")
TAG_KEYS = ("duration", "domain", "sub_category", "task_type", "question_type", "category")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


class DatasetError(DBTrimKVError, ValueError):
    """An annotation file that cannot be read or lacks a field its format needs."""


@dataclass
class QAItem:
    id: str
    video: Path
    question: str
    options: list[str] = field(default_factory=list)  # option texts, without their letters
    answer: str | None = None  # the gold letter (multiple choice) or text (open-ended)
    tags: dict[str, str] = field(default_factory=dict)

    def prompt(self) -> str:
        """What the model is asked: the question, and for multiple choice the lettered options."""
        if not self.options:
            return self.question
        return f"{self.question}\n{format_options(self.options)}\n{MC_INSTRUCTION}"


def load_dataset(path: str | Path, fmt: str, video_dir: str | Path | None = None) -> list[QAItem]:
    """Every question of an annotation file, in file order; ids must be unique (resuming relies on it)."""
    if fmt not in LOADERS:
        raise DatasetError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    video_dir = Path(video_dir) if video_dir is not None else path.parent
    items = []
    for position, record in enumerate(read_records(path)):
        try:
            items.append(LOADERS[fmt](record, position, path, video_dir))
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{path}: record {position} is not a valid {fmt} record ({exc!r})") from None
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise DatasetError(f"{path}: question id {item.id!r} appears twice; ids must be unique")
        seen.add(item.id)
        if len(item.options) > len(LETTERS):
            raise DatasetError(f"{path}: question {item.id!r} has {len(item.options)} options; at most "
                               f"{len(LETTERS)} (A-Z) can be lettered")
    return items


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}")
    if path.suffix == ".parquet":
        try:
            import pandas
        except ImportError:
            raise DatasetError(f"{path}: reading Parquet needs pandas (pip install pandas pyarrow), "
                               "or convert the file to JSON / JSONL") from None
        try:
            return pandas.read_parquet(path).to_dict(orient="records")
        except ImportError:
            raise DatasetError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), "
                               "or convert the file to JSON / JSONL") from None
        except Exception as exc:  # noqa: BLE001 - pyarrow's errors have no common base
            raise DatasetError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    text = read_utf8(path, DatasetError)
    try:
        if path.suffix == ".json":
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, RecursionError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DatasetError(f"{path}: expected a list of records (JSON objects)")
    return records


def _tags(record: dict) -> dict[str, str]:
    return {k: str(record[k]) for k in TAG_KEYS if record.get(k) is not None}


def _find_video(name: str, *folders: Path) -> Path:
    """The first existing candidate (name as given, then with a video suffix), else the plain one."""
    path = Path(name)
    if path.is_absolute():
        return path
    names = [path] if path.suffix else [path, *(path.with_suffix(s) for s in VIDEO_SUFFIXES)]
    candidates = [folder / n for folder in folders for n in names]
    return next((c for c in candidates if c.exists()), folders[0] / (path if path.suffix else path.with_suffix(".mp4")))


def _letter(answer, options: list[str]) -> str:
    """The gold option letter from a letter ("B", "B.", "(B)") or an option's text."""
    text = str(answer).strip()
    letter, body = split_option(text)
    index = LETTERS.index(letter) if letter is not None else len(options)
    if index < len(options) and body in ("", options[index]):
        return letter
    if len(text) == 1 and text in LETTERS[: len(options)]:
        return text
    if text in options:
        return LETTERS[options.index(text)]
    raise ValueError(f"answer {answer!r} is neither an option letter nor an option's text")


def _name(record: dict, *keys: str) -> str:
    """The first of `keys` the record gives a value (a non-empty string or a number); KeyError if none is there,
    ValueError for any other value (a null must never become the file `None.mp4`)."""
    key = next((k for k in keys if record.get(k) is not None), None)
    if key is None:
        if any(k in record for k in keys):
            raise ValueError(f"{' / '.join(k for k in keys if k in record)} is null: no video to open")
        raise KeyError(" or ".join(keys))
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise ValueError(f"{key} must be a file name, got {value!r}")
    return str(value)


def _option_list(record: dict, key: str) -> list[str]:
    """The record's options as texts: from a list (or an array), never from one string."""
    options = record.get(key)
    if options is None:
        return []
    if isinstance(options, (str, bytes, dict)) or not hasattr(options, "__iter__"):
        raise ValueError(f"{key} must be a list of option texts, got {type(options).__name__} {str(options)[:60]!r}")
    return [str(o) for o in options]


def _videomme(record: dict, position: int, path: Path, video_dir: Path) -> QAItem:
    if "options" not in record:
        raise KeyError("options")
    options = [split_option(o)[1] for o in _option_list(record, "options")]
    video = _name(record, "video", "video_path", "videoID")
    question_id = record.get("question_id") or f"{record.get('video_id') or record['videoID']}-{position}"
    return QAItem(str(question_id), _find_video(video, video_dir),
                  str(record["question"]), options, _letter(record["answer"], options), _tags(record))


def _mlvu(record: dict, position: int, path: Path, video_dir: Path) -> QAItem:
    if "candidates" not in record:
        raise KeyError("candidates")
    options = _option_list(record, "candidates")
    video = _name(record, "video", "video_name")
    tags = _tags(record) or {"question_type": path.stem}
    return QAItem(str(record.get("question_id") or f"{path.stem}/{position}"),
                  _find_video(video, video_dir, video_dir / path.stem), str(record["question"]), options,
                  _letter(record["answer"], options), tags)


def _jsonl(record: dict, position: int, path: Path, video_dir: Path) -> QAItem:
    options = [split_option(o)[1] for o in _option_list(record, "options")]
    answer = record.get("answer")
    if answer is not None:
        answer = _letter(answer, options) if options else str(answer)
    return QAItem(str(record.get("id", position)), _find_video(_name(record, "video"), video_dir),
                  str(record["question"]), options, answer, _tags(record))


LOADERS: dict[str, Callable[[dict, int, Path, Path], QAItem]] = {"videomme": _videomme, "mlvu": _mlvu, "jsonl": _jsonl}
