"""The `dbtrimkv` model inside lmms-eval: the entry point resolves, the offline recall task runs end
to end, its answers are the synthetic benchmark's, and each sample's cost record is the engine's
own `GenerationStats`.

Needs the `[lmms]` extra (lmms-eval pins av<16, so CI installs it in a venv of its own: `.ci/run`);
skipped where lmms_eval is not importable.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval", reason="needs the [lmms] extra (pip install -e '.[lmms]')")

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from dbtrimkv import DBTrimKVPipeline  # noqa: E402
from dbtrimkv.loading.checkpoints import load_model  # noqa: E402
from dbtrimkv.errors import ConfigError  # noqa: E402
from dbtrimkv.eval.harness import BenchmarkSpec, answer  # noqa: E402
from dbtrimkv.lmms import recall_export  # noqa: E402
from dbtrimkv.lmms.model import DBTrimKVLMM  # noqa: E402
from dbtrimkv.lmms.settings import parse_model_args  # noqa: E402
from dbtrimkv.recall.tasks import TASK_KINDS, prompt_inputs  # noqa: E402

ARGS = "pretrained=tiny-recall,memory_size=16,prefill_chunk=32,buffer_size=0"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Two prompts of each kind (cards, clip, image), as `dbtrimkv eval export-lmms DIR --examples 2` writes them."""
    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp("dbtrimkv_recall")
    prompts = {kind: BenchmarkSpec(kind=kind, task=_synthetic_task(kind), examples=2).prompts() for kind in TASK_KINDS}
    recall_export.export_task(directory, prompts)
    return directory, prompts


def _synthetic_task(kind: str) -> dict:
    """`dbtrimkv eval synthetic`'s default task parameters for `kind`."""
    if kind == "cards":
        return dict(num_cards=8, filler=32, image_size=32, answer_modality="any", needle=None, distractors=1)
    return dict(frames=8, filler=32, image_size=32, needle=None) if kind == "video" else dict(filler=32, image_size=32)


@pytest.fixture(scope="module")
def spied_run(task_dir):
    """One in-process lmms-eval run, every pipeline output it produced recorded in order."""
    directory, _ = task_dir
    outputs, real_call = [], DBTrimKVPipeline.__call__

    def spy(self, *args, **kwargs):
        result = real_call(self, *args, **kwargs)
        outputs.extend(result if isinstance(result, list) else [result])
        return result

    DBTrimKVPipeline.__call__ = spy
    try:
        results = simple_evaluate(model="dbtrimkv", model_args=ARGS, tasks=["dbtrimkv_recall"], batch_size=1,
                                  task_manager=TaskManager("WARNING", include_path=str(directory), model_name="dbtrimkv"),
                                  log_samples=True)
    finally:
        DBTrimKVPipeline.__call__ = real_call
    return results, outputs


def _response(sample) -> str:
    """The model's answer in a logged sample (a list of one in memory, the string itself on disk)."""
    response = sample["filtered_resps"]
    return response[0] if isinstance(response, list) else response


def test_entry_point_resolves_to_the_model():
    (point,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "dbtrimkv"]
    manifest = point.load()
    assert manifest.model_id == "dbtrimkv" and manifest.chat_class_path == "dbtrimkv.lmms.model.DBTrimKVLMM"
    from lmms_eval.models import get_model

    assert get_model("dbtrimkv") is DBTrimKVLMM and DBTrimKVLMM.is_simple is False


def test_bad_model_args_fail_before_loading():
    with pytest.raises(ConfigError, match="unknown dbtrimkv model arg"):
        DBTrimKVLMM.create_from_arg_string("pretrained=/nonexistent,memroy_size=16")


def test_loglikelihood_is_refused_with_a_clear_message():
    lm = DBTrimKVLMM.create_from_arg_string("pretrained=tiny-recall,memory_size=16")
    with pytest.raises(NotImplementedError, match="generate_until requests only"):
        lm.loglikelihood([])
    with pytest.raises(NotImplementedError, match="generate_until requests only"):
        lm.generate_until_multi_round([])


def test_offline_task_answers_as_the_synthetic_benchmark(task_dir, spied_run):
    """Same prompts, same engine settings: lmms-eval's answers and accuracy are `eval synthetic`'s `answer`."""
    directory, prompts = task_dir
    results, _ = spied_run
    samples = results["samples"]["dbtrimkv_recall"]
    docs = [json.loads(line) for line in (directory / recall_export.DATA_FILE).read_text().splitlines()]
    assert len(samples) == len(docs) == 6
    model, processor = load_model("tiny-recall")
    config = parse_model_args(pretrained="tiny-recall", memory_size=16, prefill_chunk=32, buffer_size=0).resolve(model)
    correct = []
    for sample in samples:
        doc = docs[sample["doc_id"]]
        example = prompts[doc["kind"]][doc["seed"]]
        expected, peak = answer(model, processor, prompt_inputs(processor, [example]), config)
        assert _response(sample) == expected, doc["id"]
        assert sample["token_counts"][0]["kv"]["peak_kv_entries"] == peak
        correct.append(expected == example.answer)
    assert results["results"]["dbtrimkv_recall"]["accuracy,none"] == pytest.approx(sum(correct) / len(correct))


def test_per_sample_cost_is_the_engines_stats(spied_run):
    results, outputs = spied_run
    samples = sorted(results["samples"]["dbtrimkv_recall"], key=lambda s: s["doc_id"])
    assert len(outputs) == len(samples)
    for sample, out in zip(samples, outputs):  # batch_size=1, documents in order
        counts = sample["token_counts"][0]
        kv = counts["kv"]
        assert {k: kv[k] for k in out.stats.to_dict()} == json.loads(json.dumps(out.stats.to_dict()))
        assert kv["peak_kv_bytes"] == out.stats.peak_kv_entries * out.cache.entry_bytes()
        assert counts["input_tokens"] == sum(out.stats.prompt_tokens.values()) and counts["output_tokens"] == 1
        assert kv["budget"] == 16 * 6 and kv["evictions"] >= 1  # memory_size x layers x KV heads
    peaks = [s["token_counts"][0]["kv"]["peak_kv_bytes"] for s in samples]
    throughput = results["throughput"]
    assert throughput["avg_dbtrimkv/dbtrimkv_recall/peak_kv_bytes_max"] == max(peaks)
    assert throughput["avg_dbtrimkv/dbtrimkv_recall/peak_kv_bytes_mean"] == pytest.approx(sum(peaks) / len(peaks))
    full = [s["token_counts"][0]["kv"]["kv_bytes_full"] for s in samples]
    assert throughput["avg_dbtrimkv/dbtrimkv_recall/kv_bytes_full_max"] == max(full) > max(peaks)


def test_batches_answer_as_single_requests(task_dir, spied_run):
    directory, _ = task_dir
    results = simple_evaluate(model="dbtrimkv", model_args=ARGS, tasks=["dbtrimkv_recall"], batch_size=3,
                              task_manager=TaskManager("WARNING", include_path=str(directory), model_name="dbtrimkv"),
                              log_samples=True)
    batched = {s["doc_id"]: s for s in results["samples"]["dbtrimkv_recall"]}
    single = {s["doc_id"]: s for s in spied_run[0]["samples"]["dbtrimkv_recall"]}
    assert {i: _response(s) for i, s in batched.items()} == {i: _response(s) for i, s in single.items()}
    assert [s["token_counts"][0]["kv"]["batch_size"] for s in batched.values()] == [3] * 6  # one group, two batches


def _console_script(name: str) -> str:
    """The console script `name` of the environment running the tests (lmms-eval's, installed with the extra)."""
    script = shutil.which(name, path=str(Path(sys.executable).parent))
    assert script, f"{name} is not installed beside {sys.executable}"
    return script


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["lmms-eval", "python -m dbtrimkv.lmms"])
def test_lmms_eval_command_runs_the_offline_task(task_dir, tmp_path, launcher):
    """The issue's command as a user types it (plain `lmms-eval`, and `python -m dbtrimkv.lmms`, the same with
    dbtrimkv imported first for a CPU-only torch beside PyPI's torchvision), on a handful of samples: the
    answers, the accuracy and the per-sample cost it reports are the synthetic benchmark's."""
    directory, prompts = task_dir
    command = [_console_script("lmms-eval")] if launcher == "lmms-eval" else [sys.executable, "-m", "dbtrimkv.lmms"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [*command, "--model", "dbtrimkv", "--model_args", "pretrained=tiny-recall,memory_size=16",
         "--tasks", "dbtrimkv_recall", "--include_path", str(directory), "--limit", "3",
         "--output_path", str(tmp_path / "out"), "--log_samples"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (results_file,) = glob.glob(str(tmp_path / "out" / "*" / "*_results.json"))
    (samples_file,) = glob.glob(str(tmp_path / "out" / "*" / "*_samples_dbtrimkv_recall.jsonl"))
    results = json.loads(open(results_file).read())
    samples = [json.loads(line) for line in open(samples_file)]
    docs = [json.loads(line) for line in (directory / recall_export.DATA_FILE).read_text().splitlines()]
    model, processor = load_model("tiny-recall")
    config = parse_model_args(pretrained="tiny-recall", memory_size=16).resolve(model)
    correct = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = docs[sample["doc_id"]]
        example = prompts[doc["kind"]][doc["seed"]]
        expected, peak = answer(model, processor, prompt_inputs(processor, [example]), config)
        kv = sample["token_counts"][0]["kv"]
        assert _response(sample) == expected and kv["peak_kv_entries"] == peak, doc["id"]
        assert kv["policy"] == "global" and kv["budget"] == 96 and kv["peak_kv_bytes"] == peak * 256
        correct.append(expected == example.answer)
    assert [s["doc_id"] for s in sorted(samples, key=lambda s: s["doc_id"])] == [0, 1, 2]
    assert results["results"]["dbtrimkv_recall"]["accuracy,none"] == pytest.approx(sum(correct) / 3)
    assert results["throughput"]["avg_dbtrimkv/dbtrimkv_recall/samples"] == 3
    assert "dbtrimkv_recall" in result.stdout and "accuracy" in result.stdout  # lmms-eval's own table


def _instance(doc_to_messages, gen_kwargs: dict, doc_id: int, task: str = "public_like") -> Instance:
    return Instance(request_type="generate_until", arguments=("ctx", doc_to_messages, gen_kwargs, doc_id, task, "test"),
                    idx=0, metadata={"task": task, "doc_id": doc_id, "repeats": 1})


def test_generate_until_honours_until_max_new_tokens_and_video_files(tmp_path):
    """Requests shaped like public tasks' (lmms-eval's auto messages: media first, then the question, a
    new assistant turn): a PIL image, an image path and an mp4 decoded at the model's fps / max_frames."""
    import random

    from helpers import write_clip

    from dbtrimkv.recall.tasks import draw_digit

    image, _ = draw_digit("7", 32, random.Random(0))
    image.save(tmp_path / "seven.png")
    clip = write_clip(tmp_path / "clip.mp4", frames=24, fps=8)
    docs = [{"visual": image, "q": "which digit is in the image?"},
            {"visual": str(tmp_path / "seven.png"), "q": "which digit is in the image?"},
            {"visual": str(clip), "q": "which digit is in the video?"}]

    def doc_to_messages(doc):
        kind = "video" if isinstance(doc["visual"], str) and doc["visual"].endswith(".mp4") else "image"
        return [{"role": "user", "content": [{"type": kind, "url": doc["visual"]}, {"type": "text", "text": doc["q"]}]}]

    lm = DBTrimKVLMM.create_from_arg_string("pretrained=tiny-recall,memory_size=16,fps=2,max_frames=4,batch_size=2")
    lm.task_dict = {"public_like": {"test": docs}}
    free = lm.generate_until([_instance(doc_to_messages, {"max_new_tokens": 8, "until": []}, i) for i in range(3)])
    cut = lm.generate_until([_instance(doc_to_messages, {"max_new_tokens": 8, "until": [":"]}, i) for i in range(3)])
    short = lm.generate_until([_instance(doc_to_messages, {"max_new_tokens": 2}, i) for i in range(3)])
    assert [r.text for r in free[:2]] == ["image:7", "image:7"]  # the shipped model answers its own question
    assert [r.text for r in cut] == [r.text.split(":")[0] for r in free] and cut[0].text == "image"
    # generation stopped at the ':' (the tokens after it were never generated), not cut afterwards
    assert all(c.token_counts.output_tokens < f.token_counts.output_tokens for c, f in zip(cut, free) if ":" in f.text)
    assert all(r.token_counts.output_tokens <= 2 for r in short) and all(r.token_counts.output_tokens > 2 for r in free)
    video = free[2].token_counts.kv
    assert video["prompt_tokens"]["video"] > 0 and video["batch_size"] == 1 and free[0].token_counts.kv["batch_size"] == 2
    assert any("4 frames" in note for note in video["notes"]), video["notes"]  # 3 s at 2 fps > max_frames=4: spread


def test_generate_until_runs_left_padded_batches_that_answer_as_alone():
    """lmms-eval hands the model every request at once: requests of one task and generation settings go
    `batch_size` at a time through one left-padded pipeline call, other settings in batches of their own,
    and each answer (text, tokens, stop) is the one the request gets alone; results come back in order."""
    import random

    from dbtrimkv.recall.tasks import draw_digit

    rng = random.Random(0)
    questions = ["which digit?", "which digit is shown in this image?", "digit?",
                 "look closely at the picture: which digit is written in it?", "what digit is this?"]
    docs = [{"image": draw_digit(str(d), 32, rng)[0], "q": q} for d, q in zip((7, 2, 9, 4, 1), questions)]

    def doc_to_messages(doc):
        return [{"role": "user", "content": [{"type": "image", "url": doc["image"]}, {"type": "text", "text": doc["q"]}]}]

    long, short = {"max_new_tokens": 6, "until": [":"]}, {"max_new_tokens": 3}
    requests = [_instance(doc_to_messages, long if i % 2 == 0 else short, i // 2) for i in range(10)]  # interleaved
    lm = DBTrimKVLMM.create_from_arg_string("pretrained=tiny-recall,memory_size=16,batch_size=2")
    lm.task_dict = {"public_like": {"test": docs}}
    masks, real_build = [], lm.pipeline.build_inputs

    def recording_build(*args, **kwargs):
        inputs = real_build(*args, **kwargs)
        masks.append(inputs["attention_mask"].clone())
        return inputs

    lm.pipeline.build_inputs = recording_build
    batched = lm.generate_until(requests)
    assert [m.shape[0] for m in masks] == [2, 2, 1, 2, 2, 1]  # 5 `long` requests, then 5 `short` ones
    padded = [row for m in masks for row in m if not row.all()]
    assert padded and all(bool((row.cummax(0).values == row).all()) for row in padded)  # zeros first: left padding
    lm.batch_size = 1
    alone = [lm.generate_until([request])[0] for request in requests]
    assert [(r.text, r.token_counts.output_tokens) for r in batched] == [(r.text, r.token_counts.output_tokens)
                                                                         for r in alone]
    assert [r.token_counts.kv["batch_size"] for r in batched] == [2] * 8 + [1, 1]  # in the requests' order
    assert [r.text for r in batched[::2]] == ["image"] * 5  # "image:7" and the like, stopped at the ':'
