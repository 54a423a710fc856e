"""The synthetic recall set as an offline lmms-eval task (`dbtrimkv eval export-lmms DIR`).

Why: lmms-eval reads tasks from YAML files and datasets; the recall prompts are generated from
seeds in memory. Exporting them (cards, single images, clips) to plain files lets
`lmms-eval --model dbtrimkv --tasks dbtrimkv_recall --include_path DIR` run offline on exactly the
prompts `dbtrimkv eval synthetic` answers: the same seeds and task parameters
(`BenchmarkSpec.prompts`), images and frames saved losslessly (PNG), the chat kept part by part
(interleaved text and media, the assistant's answer prefix last, which the model continues), and
the same scoring (the generated token must be the digit itself; one new token).

The task is generated, not shipped, because its data file is named by absolute path in the YAML
(lmms-eval resolves `data_files` against the working directory) and its size is the caller's choice.
Files written in DIR: `dbtrimkv_recall.yaml`, `dbtrimkv_recall_utils.py` (two lines naming this
module's functions for the YAML), `recall.jsonl` (one document per prompt) and `media/*.png`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..recall.tasks import RecallExample

TASK_NAME = "dbtrimkv_recall"
DATA_FILE = "recall.jsonl"
UTILS_MODULE = "dbtrimkv_recall_utils"

YAML = """\
# written by `dbtrimkv eval export-lmms` (dbtrimkv.lmms.recall_export): {count} synthetic recall prompts
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_messages: !function {utils}.doc_to_messages
doc_to_text: !function {utils}.doc_to_text
doc_to_target: answer
process_results: !function {utils}.process_results
generation_kwargs:
  max_new_tokens: 1
  until: []
  do_sample: false
  temperature: 0
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

UTILS = """\
# the task's functions live in the installed package (the YAML's `!function` reads this file)
from dbtrimkv.lmms.recall_export import doc_to_messages, doc_to_text, process_results  # noqa: F401
"""


def export_task(directory: str | Path, examples: dict[str, list[RecallExample]]) -> Path:
    """Write the task for `examples` (kind -> prompts) into `directory`; returns the YAML's path."""
    directory = Path(directory).resolve()
    try:
        (directory / "media").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot write the task into {directory}: {exc.strerror or exc}") from None
    docs = [_document(kind, example, directory) for kind, prompts in examples.items() for example in prompts]
    with open(directory / DATA_FILE, "w") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")
    (directory / f"{UTILS_MODULE}.py").write_text(UTILS)
    yaml_path = directory / f"{TASK_NAME}.yaml"
    yaml_path.write_text(YAML.format(count=len(docs), task=TASK_NAME, data=json.dumps(str(directory / DATA_FILE)),
                                     utils=UTILS_MODULE))
    return yaml_path


def _document(kind: str, example: RecallExample, directory: Path) -> dict:
    name = f"{kind}-{example.seed}"
    counter = iter(range(1_000_000))

    def save(image) -> str:
        relative = f"media/{name}-{next(counter)}.png"
        image.save(directory / relative)
        return relative

    messages = []
    for message in example.messages:
        parts = []
        for part in message["content"]:
            if part["type"] == "image":
                parts.append({"type": "image", "url": save(part["image"])})
            elif part["type"] == "video":
                parts.append({"type": "video", "url": [save(frame) for frame in part["video"]], "fps": part["fps"]})
            else:
                parts.append({"type": "text", "text": part["text"]})
        messages.append({"role": message["role"], "content": parts})
    return {"id": name, "kind": kind, "seed": example.seed, "answer": example.answer,
            "answer_modality": example.answer_modality, "root": str(directory), "messages": json.dumps(messages)}


def doc_to_messages(doc: dict) -> list[dict]:
    """The prompt's chat with media paths made absolute (lmms-eval's chat-message format)."""
    root = Path(doc["root"])
    messages = json.loads(doc["messages"])
    for message in messages:
        for part in message["content"]:
            if part["type"] == "image":
                part["url"] = str(root / part["url"])
            elif part["type"] == "video":
                part["url"] = [str(root / frame) for frame in part["url"]]
    return messages


def doc_to_text(doc: dict) -> str:
    """The prompt's text parts (lmms-eval's plain-text context; the model reads `doc_to_messages`)."""
    return "".join(p["text"] for m in json.loads(doc["messages"]) for p in m["content"] if p["type"] == "text")


def process_results(doc: dict, results: list[str]) -> dict:
    """Right when the generated text is exactly the digit (the synthetic benchmark's rule)."""
    return {"accuracy": float(results[0] == doc["answer"])}
