"""The lmms-eval glue that needs no lmms-eval: model args, message translation, cost records, the
exported recall task (same prompts as `dbtrimkv eval synthetic`, token for token and pixel for pixel).

The runs through lmms-eval itself are in `test_lmms_eval_run.py` (CI runs them in a venv with the
`[lmms]` extra; they skip here without it).
"""

from __future__ import annotations

import json

import pytest
import torch

from dbtrimkv import DBTrimKVPipeline
from dbtrimkv.loading.checkpoints import load_model
from dbtrimkv.cli import main as cli_main
from dbtrimkv.settings.config import DBTrimKVConfig
from dbtrimkv.errors import DBTrimKVError, PromptError
from dbtrimkv.eval.harness import BenchmarkSpec
from dbtrimkv.lmms import recall_export
from dbtrimkv.lmms.cost import sample_cost, task_summary
from dbtrimkv.lmms.messages import generation_settings, to_pipeline_messages
from dbtrimkv.lmms.settings import parse_model_args
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.recall.tasks import TASK_KINDS, prompt_inputs

SYNTHETIC_DEFAULTS = dict(num_cards=8, filler=32, distractors=1, frames=8, image_size=32, answer_modality="any",
                          needle=None, policies=[], budgets=[], prefill_chunk=32, buffer_size=0, threshold=None)


@pytest.fixture(scope="module")
def tiny_recall():
    torch.set_num_threads(1)
    return load_model("tiny-recall")


@pytest.mark.parametrize("args, message", [
    (dict(memroy_size=16), "unknown dbtrimkv model arg(s) memroy_size"),
    (dict(memory_size=0), "memory_size must be a positive integer"),
    (dict(policy="lru"), "unknown policy 'lru'"),
    (dict(policy_options="{window: 8"), "policy_options must be a JSON object"),
    (dict(policy_options="[8]"), "policy_options must be a JSON object"),
    (dict(full_cache=True, memory_size=16), "full_cache=true keeps every entry"),
    (dict(full_cache="maybe"), "full_cache must be true or false"),
    (dict(fps=0), "fps must be a positive number"),
    (dict(batch_size="two"), "batch_size must be a positive integer"),
    (dict(dtype="float8"), "unknown dtype 'float8'"),
])
def test_bad_model_args_fail_with_one_clear_error(args, message):
    with pytest.raises(DBTrimKVError) as info:
        parse_model_args(pretrained="/nonexistent/checkpoint", **args)  # never loaded: checked first
    assert message in str(info.value)


def test_model_args_become_pipeline_settings():
    args = parse_model_args(pretrained="tiny-recall", memory_size=16, policy="snapkv", policy_options='{"window": 8}',
                            prefill_chunk=32, buffer_size=0, fps=1.5, max_frames="none", batch_size="3")
    assert (args.pretrained, args.batch_size, args.video.fps, args.video.max_frames) == ("tiny-recall", 3, 1.5, None)
    config = args.resolve()
    assert (config.memory_size, config.budget, config.policy, config.policy_options) == (16, None, "snapkv", {"window": 8})
    assert (config.prefill_chunk, config.buffer_size) == (32, 0)


def test_full_cache_args_give_the_synthetic_benchmarks_full_row(tiny_recall):
    """`full_cache=true,prefill_chunk=32,buffer_size=0` is exactly the config of `eval synthetic`'s full-cache column."""
    model, _ = tiny_recall
    args = parse_model_args(full_cache=True, prefill_chunk=32, buffer_size=0)
    assert args.resolve(model) == DBTrimKVConfig(prefill_chunk=32, buffer_size=0)
    assert parse_model_args(memory_size=16).resolve(model).memory_size == 16


def test_lmms_messages_become_a_dbtrimkv_chat(tmp_path):
    chat = to_pipeline_messages([
        {"role": "user", "content": [{"type": "image", "url": "a.png"}, {"type": "text", "text": "what?"},
                                     {"type": "video", "url": ["f0.png", "f1.png"], "fps": 1.0}]},
        {"role": "assistant", "content": "It is"},
    ], system_prompt="Be brief.")
    assert chat == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "what?"},
                                     {"type": "video", "video": ["f0.png", "f1.png"], "fps": 1.0}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is"}]},
    ]
    with pytest.raises(PromptError, match="text, image and video"):
        to_pipeline_messages([{"role": "user", "content": [{"type": "audio", "url": "a.wav"}]}])
    with pytest.raises(PromptError, match="video_start"):
        to_pipeline_messages([{"role": "user", "content": [{"type": "video", "url": {"video_start": 3}}]}])
    with pytest.raises(PromptError, match="non-empty list"):
        to_pipeline_messages([])


def test_generation_settings_and_stop_strings():
    settings, until = generation_settings({"until": "\n\n", "max_new_tokens": 7, "temperature": 0})
    assert settings == {"max_new_tokens": 7, "do_sample": False} and until == ["\n\n"]
    settings, until = generation_settings({"temperature": 0.7, "top_p": 0.9})
    assert settings == {"max_new_tokens": 128, "do_sample": True, "temperature": 0.7, "top_p": 0.9} and until == []
    with pytest.raises(PromptError):
        generation_settings({"until": [3]})


def test_cost_record_is_the_engines_generation_stats(tiny_recall):
    pipe = DBTrimKVPipeline(*tiny_recall, DBTrimKVConfig(memory_size=4, prefill_chunk=16, buffer_size=0))
    out = pipe("which digit is in the image?", max_new_tokens=3, progress=False)
    record = sample_cost(out, batch_size=1)
    stats = out.stats.to_dict()
    assert {k: record[k] for k in stats} == stats  # every GenerationStats field, unchanged
    assert record["entry_bytes"] == out.cache.entry_bytes() > 0
    assert record["peak_kv_bytes"] == out.stats.peak_kv_entries * out.cache.entry_bytes()
    assert record["kv_bytes_full"] == out.stats.kv_entries_full * record["entry_bytes"]
    assert out.stats.evictions > 0 and record["peak_kv_entries"] < record["kv_entries_full"]


def test_task_summary_counts_a_batch_once():
    base = dict(policy="global", budget=96, entry_bytes=256)
    records = [dict(base, peak_kv_bytes=100, peak_kv_entries=1, kv_bytes_full=400, new_tokens=4, decode_seconds=2.0,
                    prefill_seconds=1.0, batch_size=2),
               dict(base, peak_kv_bytes=300, peak_kv_entries=3, kv_bytes_full=600, new_tokens=4, decode_seconds=2.0,
                    prefill_seconds=1.0, batch_size=2),
               dict(base, peak_kv_bytes=200, peak_kv_entries=2, kv_bytes_full=200, new_tokens=2, decode_seconds=1.0,
                    prefill_seconds=0.5, batch_size=1)]
    summary = task_summary(records)
    assert (summary["peak_kv_bytes_mean"], summary["peak_kv_bytes_max"], summary["peak_kv_entries_max"]) == (200, 300, 3)
    assert (summary["kv_bytes_full_mean"], summary["kv_bytes_full_max"]) == (400, 600)
    assert summary["decode_seconds"] == 3.0 and summary["prefill_seconds"] == 1.5  # the batch of two counted once
    assert summary["tokens_per_second"] == 10 / 3 and summary["samples"] == 3
    assert summary["kv_fraction_mean"] == pytest.approx((0.25 + 0.5 + 1.0) / 3)
    assert task_summary([]) == {"samples": 0}


def _docs(directory):
    return [json.loads(line) for line in (directory / recall_export.DATA_FILE).read_text().splitlines()]


def test_exported_task_holds_the_synthetic_prompts_exactly(tmp_path, tiny_recall):
    """Export through the CLI, read every document back as lmms-eval hands it to the model: the model
    inputs equal `eval synthetic`'s for the same seed (token ids, pixels, grids)."""
    _, processor = tiny_recall
    assert cli_main(["eval", "export-lmms", str(tmp_path / "task"), "--examples", "2"]) == 0
    directory = tmp_path / "task"
    docs = _docs(directory)
    assert [(d["kind"], d["seed"]) for d in docs] == [(k, s) for k in TASK_KINDS for s in (0, 1)]
    yaml = (directory / "dbtrimkv_recall.yaml").read_text()
    assert "task: dbtrimkv_recall" in yaml and json.dumps(str(directory / "recall.jsonl")) in yaml
    assert "max_new_tokens: 1" in yaml and (directory / "dbtrimkv_recall_utils.py").is_file()
    for doc in docs:
        spec = BenchmarkSpec.from_args(type("Args", (), dict(SYNTHETIC_DEFAULTS, kind=doc["kind"], examples=2))())
        example = spec.prompts()[doc["seed"]]
        assert doc["answer"] == example.answer and doc["answer_modality"] == example.answer_modality
        expected = prompt_inputs(processor, [example])
        chat = to_pipeline_messages(recall_export.doc_to_messages(doc))
        got = build_inputs(processor, chat, add_generation_prompt=False, continue_final_message=True)
        assert sorted(got) == sorted(expected)
        for key in expected:
            assert torch.equal(got[key], expected[key]), (doc["id"], key)
        assert recall_export.process_results(doc, [doc["answer"]]) == {"accuracy": 1.0}
        assert recall_export.process_results(doc, [" " + doc["answer"]]) == {"accuracy": 0.0}  # exact, as synthetic
    assert "which digit is in the video?" in recall_export.doc_to_text(docs[2])


def test_export_takes_the_synthetic_task_flags(tmp_path):
    assert cli_main(["eval", "export-lmms", str(tmp_path), "--kinds", "cards", "--examples", "1", "--num-cards", "3",
                     "--answer-modality", "text"]) == 0
    (doc,) = _docs(tmp_path)
    assert doc["answer_modality"] == "text"
    texts = [p["text"] for m in json.loads(doc["messages"]) for p in m["content"] if p["type"] == "text"]
    assert sum(len(t) == 1 and t.isupper() for t in texts) == 3 + 1  # three card keys, and the answer prefix


def test_export_refuses_bad_flags_and_directories(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli_main(["eval", "export-lmms", str(tmp_path), "--kinds", "audio"])
    assert "invalid choice: 'audio'" in capsys.readouterr().err
    assert cli_main(["eval", "export-lmms", str(tmp_path), "--image-size", "8"]) == 2
    assert capsys.readouterr().err.strip() == "dbtrimkv: error: recall task: image_size must be >= 32, filler and distractors >= 0"
    (tmp_path / "file").write_text("")
    assert cli_main(["eval", "export-lmms", str(tmp_path / "file"), "--examples", "1"]) == 2
    assert capsys.readouterr().err.strip() == f"dbtrimkv: error: cannot write DIR {tmp_path / 'file'}: it is a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written beside it


def test_ci_runs_the_lmms_tests_with_the_extra_in_a_venv_of_its_own():
    from pathlib import Path

    run = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    block = run[run.index("lmms_dir=$(mktemp -d)"):]
    steps = ['python -m venv --system-site-packages "$lmms"',
             '"$lmms/bin/pip" install -q -e ".[test,lmms]" -c constraints.txt',
             # plain `lmms-eval` needs a torchvision that imports: else PyPI's build of the same torch release
             'if ! "$lmms/bin/python" -c "import torchvision" 2>/dev/null; then',
             '"$lmms/bin/pip" install -q "torch===$release" -c constraints.txt',
             '"$lmms/bin/python" -m pytest -p no:cacheprovider tests/lmms']
    assert all(step in block for step in steps)
    assert [block.index(step) for step in steps] == sorted(block.index(step) for step in steps)


def test_pipeline_continues_the_assistants_answer_prefix(tiny_recall):
    """`continue_final_message=True`: the chat's last (assistant) message is continued, as the synthetic
    benchmark's prompts are: the pipeline answers each with the harness's token."""
    from dbtrimkv.eval.harness import answer

    model, processor = tiny_recall
    config = DBTrimKVConfig(memory_size=16, prefill_chunk=32, buffer_size=0)
    pipe = DBTrimKVPipeline(model, processor, config)
    examples = [BenchmarkSpec(kind=kind, examples=1).prompts()[0] for kind in TASK_KINDS]
    outputs = pipe([ex.messages for ex in examples], max_new_tokens=1, progress=False, continue_final_message=True)
    answers = [answer(model, processor, prompt_inputs(processor, [ex]), config)[0] for ex in examples]
    assert [out.text for out in outputs] == answers  # a left-padded batch of three, answered as one by one
    reopened = pipe(examples[0].messages, max_new_tokens=1, progress=False)  # a new assistant turn instead
    assert reopened.stats.prompt_tokens["text"] > outputs[0].stats.prompt_tokens["text"]
