"""The recall model's trainer: it supervises exactly the answers, and its recipe pieces do what they say."""

from __future__ import annotations

import json

import pytest

from dbtrimkv.recall.recall_model import build_model, load_recipe
from dbtrimkv.recall.tasks import (
    ImageRecallTask, RecallExample, RecallTask, VideoRecallTask, image_example, recall_example, video_example,
)
from dbtrimkv.recall.train_model import CopyChat, _lr_at, collate, copy_chat, parameter_groups, sample_batch
from dbtrimkv.loading.tiny import build_processor


@pytest.mark.parametrize("seed", range(6))
def test_collate_supervises_every_answer_digit_and_its_end_token(seed):
    processor = build_processor()
    task = RecallTask(num_cards=2 + seed, filler=seed * 5, distractors=seed % 3, questions=1 + seed % 4)
    batch = [recall_example(seed, task), recall_example(seed + 100, task),
             video_example(seed, VideoRecallTask(frames=3)), image_example(seed, ImageRecallTask(filler=seed))]
    inputs, targets = collate(processor, batch)
    ids = inputs["input_ids"]
    tokens = {(r, c): processor.tokenizer.decode(ids[r, c]) for r, c in targets}
    for row, example in enumerate(batch[:2]):
        digits = sorted(c for (r, c), tok in tokens.items() if r == row and tok != "<|im_end|>")
        assert [tokens[(row, c)] for c in digits] == example.answers
        assert all(tokens[(row, c + 1)] == "<|im_end|>" for c in digits)
        # the token before each answer is the echoed key, given and not supervised
        before = [processor.tokenizer.decode(ids[row, c - 1 : c]) for c in digits]
        assert before == [example.cards[i].key for i in example.queried]
    # the clip's and the image's whole reply is supervised: their prefixes are fixed, so the model learns them
    assert "".join(tok for (r, c), tok in sorted(tokens.items()) if r == 2) == f"video:{batch[2].answer}<|im_end|>"
    assert "".join(tok for (r, c), tok in sorted(tokens.items()) if r == 3) == f"image:{batch[3].answer}<|im_end|>"
    assert len(targets) == 2 * sum(len(ex.answers) for ex in batch[:2]) + 2 * (len("video:") + 2)


def test_collate_also_supervises_the_recalls_inside_the_stream():
    processor = build_processor()
    example = recall_example(4, RecallTask(num_cards=5, filler=10, recalls=7, questions=2))
    inputs, targets = collate(processor, [example])
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    decoded = [processor.tokenizer.decode(inputs["input_ids"][0, c - 1 : c + 1]) for _, c in targets]
    recalls = [d for d in decoded if not d.endswith("<|im_end|>")]
    assert len(recalls) == 7 + 2  # every recall and both answers; never a card's own first mention
    values = {card.key: card.value for card in example.cards}
    for key, value in recalls:
        assert values[key] == value and text.index(key) < text.rindex(key + value)


@pytest.mark.parametrize("seed", range(4))
def test_copy_chats_supervise_every_repeated_token_and_only_those(seed):
    processor = build_processor()
    batch = [copy_chat(seed, 5 + seed), copy_chat(seed + 50, 12)]
    assert batch[0] == copy_chat(seed, 5 + seed) and len(batch[0].text) == 5 + seed
    inputs, targets = collate(processor, batch)
    for row, chat in enumerate(batch):
        columns = sorted(c for r, c in targets if r == row)
        supervised = [processor.tokenizer.decode(inputs["input_ids"][row, c]) for c in columns]
        assert supervised == [*chat.text, "<|im_end|>"]
        assert columns == list(range(columns[0], columns[0] + len(chat.text) + 1))  # one run: the assistant's
        before = processor.tokenizer.decode(inputs["input_ids"][row, : columns[0]])
        assert before.endswith(chat.text + "<|im_end|>\n<|im_start|>assistant\n")


def test_copy_batches_come_in_the_recipes_share_in_text_only_stages():
    mixture = dict(load_recipe()["mixture"], copy=0.5, copy_length=[3, 4])
    kinds = [type(sample_batch(1000 * i, 2, mixture, [2, 0, "text"])[0]) for i in range(200)]
    assert 70 <= kinds.count(CopyChat) <= 130 and set(kinds) == {CopyChat, RecallExample}
    later = [sample_batch(1000 * i, 2, mixture, [2, 0])[0] for i in range(200)]
    assert not any(isinstance(ex, CopyChat) for ex in later)
    prefixes = [ex.messages[-1]["content"][0]["text"] for ex in later]
    assert 30 <= prefixes.count("video:") <= 70 and 30 <= prefixes.count("image:") <= 70  # 25% each


def test_learning_rate_schedule_warms_up_holds_then_decays():
    peak = 1e-3
    assert _lr_at(0, 100, peak, 10, 0.2, 0.05) == pytest.approx(peak / 10)
    assert _lr_at(50, 100, peak, 10, 0.2, 0.05) == peak
    assert _lr_at(80, 100, peak, 10, 0.2, 0.05) == pytest.approx(peak)
    assert _lr_at(90, 100, peak, 10, 0.2, 0.05) == pytest.approx(peak * (0.05 + 0.95 * 0.5))
    assert _lr_at(100, 100, peak, 10, 0.2, 0.05) == pytest.approx(peak * 0.05)


def test_vision_tower_gets_its_own_learning_rate():
    recipe = load_recipe()
    model, _ = build_model(recipe["model"], seed=0)
    text, vision = parameter_groups(model, {"lr": 2e-3, "vision_lr": 5e-4})
    names = {id(p): n for n, p in model.named_parameters()}
    assert vision["peak_lr"] == 5e-4 and text["peak_lr"] == 2e-3
    assert vision["params"] and all(names[id(p)].startswith("model.visual.") for p in vision["params"])
    assert len(text["params"]) + len(vision["params"]) == len(list(model.parameters()))


def test_batches_are_a_pure_function_of_the_seed():
    mixture = load_recipe()["mixture"]
    for seed in range(120, 130):  # copy and recall batches alike
        a = sample_batch(seed, 3, mixture, [4, 8, "text"])
        b = sample_batch(seed, 3, mixture, [4, 8, "text"])
        assert [ex.training_messages()[-1] for ex in a] == [ex.training_messages()[-1] for ex in b]
        assert [ex.training_messages()[0]["content"][0] for ex in a] == [
            ex.training_messages()[0]["content"][0] for ex in b]


def small_recipe(tmp_path, steps: int = 4):
    """configs/recall-tiny.yaml shrunk to seconds: smaller model, batch and evaluation."""
    import yaml

    recipe = load_recipe()
    recipe["model"]["text"].update(hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16,
                                   mrope_section=[2, 3, 3])
    recipe["model"]["vision"].update(depth=1, hidden_size=32, intermediate_size=64)
    recipe["train"].update(steps=steps, batch_size=2, log_every=1, eval_every=steps, warmup=1)
    recipe["curriculum"].update(check_every=2, check_examples=2, advance_at=0.0)
    recipe["eval"]["examples"] = 2
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, recipe


def test_train_runs_the_recipe_and_saves_a_loadable_model(tmp_path):
    import torch

    from dbtrimkv.recall.train_model import train
    from dbtrimkv.loading.models import load_base_model

    path, recipe = small_recipe(tmp_path)
    scores = train(path, output=tmp_path / "model", threads=1)
    assert set(scores) == {"cards", "video", "image"} and all(0.0 <= v <= 1.0 for v in scores.values())
    trained, _ = load_base_model(tmp_path / "model")
    initial, _ = build_model(recipe["model"], recipe["seed"])
    assert trained.config.text_config.hidden_size == 64
    changed = [n for (n, a), (_, b) in zip(trained.state_dict().items(), initial.state_dict().items())
               if not torch.equal(a, b)]
    assert any(n.startswith("model.visual.") for n in changed) and any("language_model" in n for n in changed)


def test_train_gates_installs_trained_rg10_gates_next_to_the_model(tmp_path):
    import yaml

    import dbtrimkv
    from dbtrimkv.loading.checkpoints import gates_are_trained
    from dbtrimkv.recall.train_gates import train_gates
    from dbtrimkv.recall.recall_model import save_model
    from dbtrimkv.settings.presets import load_yaml

    _, recipe = small_recipe(tmp_path)
    model, processor = build_model(recipe["model"], seed=0)
    save_model(model, processor, tmp_path / "recall")
    config = load_yaml("train-recall-gates")
    config.update(output_dir=str(tmp_path / "run"), train_data=str(tmp_path / "run" / "data" / "train.jsonl"),
                  max_steps=2, batch_size=2, log_every=1, max_length=512)
    (tmp_path / "gates.yaml").write_text(yaml.safe_dump(config))
    train_gates(tmp_path / "gates.yaml", examples=4, asset_dir=tmp_path / "recall", serve_memory_size=5)
    lines = (tmp_path / "run" / "data" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 4
    loaded, _ = dbtrimkv.load_model(tmp_path / "recall")
    assert gates_are_trained(loaded)
    gate = loaded.model.language_model.layers[0].self_attn.retention_gate
    assert gate.state_dict().keys() and config["gate_type"] == "rg10"
    from dbtrimkv.loading.checkpoints import default_eviction_config

    eviction = default_eviction_config(loaded)  # what chat / the demo use without budget options
    assert (eviction.memory_size, eviction.policy) == (5, "global") and config["memory_size"] != 5
    with pytest.warns(UserWarning, match="untrained"):  # the staged base holds no gates: training started fresh
        fresh, _ = dbtrimkv.load_model(tmp_path / "run" / "base")
    assert not gates_are_trained(fresh)


def test_a_second_gate_stage_continues_from_the_installed_gates_on_its_own_section(tmp_path, monkeypatch):
    """`continue_gates`: stage 2 starts from the gates stage 1 installed (not fresh ones), draws its
    chats from the recipe section it names, and installs its gates in their place; without gates to
    continue from, or with a section the recipe lacks, one clear error before any training."""
    from pathlib import Path

    import torch
    import yaml

    import dbtrimkv
    from dbtrimkv.errors import ConfigError
    from dbtrimkv.modeling.gates import gate_parameters
    from dbtrimkv.settings.presets import load_yaml
    from dbtrimkv.recall.recall_model import save_model
    from dbtrimkv.recall import train_gates as module
    from dbtrimkv.recall.train_gates import train_gates

    recipe_path, recipe = small_recipe(tmp_path)
    recipe["gate_data_long"] = {"video": 1.0, "video_frames": [6, 8], "video_fps": [0.05, 0.1]}
    recipe_path.write_text(yaml.safe_dump(recipe))
    model, processor = build_model(recipe["model"], seed=0)
    save_model(model, processor, tmp_path / "recall")
    config = load_yaml("train-recall-gates")
    config.update(output_dir=str(tmp_path / "run"), train_data=str(tmp_path / "run" / "data" / "train.jsonl"),
                  max_steps=1, batch_size=2, log_every=1, max_length=512, warmup_steps=0)
    (tmp_path / "gates.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="no gates to continue"):
        train_gates(tmp_path / "gates.yaml", examples=2, asset_dir=tmp_path / "recall", recipe=recipe_path,
                    continue_gates=True)
    with pytest.raises(ConfigError, match="no 'gate_data_short' section"):
        train_gates(tmp_path / "gates.yaml", examples=2, asset_dir=tmp_path / "recall", recipe=recipe_path,
                    gate_data="gate_data_short")
    train_gates(tmp_path / "gates.yaml", examples=2, asset_dir=tmp_path / "recall", recipe=recipe_path)
    stage1 = {k: v.clone() for k, v in gate_parameters(dbtrimkv.load_model(tmp_path / "recall")[0]).items()}

    seen, real = {}, module.train

    def spy(cfg):  # the model the trainer starts from
        seen["start"] = {k: v.clone() for k, v in gate_parameters(dbtrimkv.load_model(cfg.model)[0]).items()}
        seen["data"] = Path(cfg.train_data).read_text()
        return real(cfg)

    monkeypatch.setattr(module, "train", spy)
    config.update(output_dir=str(tmp_path / "run2"), train_data=str(tmp_path / "run2" / "data" / "train.jsonl"))
    (tmp_path / "gates2.yaml").write_text(yaml.safe_dump(config))
    train_gates(tmp_path / "gates2.yaml", examples=2, asset_dir=tmp_path / "recall", recipe=recipe_path,
                gate_data="gate_data_long", continue_gates=True)
    assert seen["start"].keys() == stage1.keys()
    assert all(torch.equal(seen["start"][k], v) for k, v in stage1.items())  # not fresh gates
    assert seen["data"].count('"type": "video"') == 2 and '"fps": 0.0' in seen["data"]  # the long section's clips
    after = gate_parameters(dbtrimkv.load_model(tmp_path / "recall")[0])
    trained = gate_parameters(dbtrimkv.load_model(tmp_path / "run2")[0])
    assert all(torch.equal(after[k], trained[k]) for k in stage1)  # stage 2's gates installed in their place
    assert any(not torch.equal(after[k], v) for k, v in stage1.items())


def test_a_run_stopped_and_resumed_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    import torch
    import yaml
    from safetensors.torch import load_file

    from dbtrimkv.recall.train_model import RESUME_DIR, train

    path, recipe = small_recipe(tmp_path, steps=4)
    recipe["train"].update(checkpoint_every=3, eval_every=100)
    recipe["mixture"].update(video=0.5, video_frames=[2, 6], video_frames_scale="log", video_batch_size=1)
    path.write_text(yaml.safe_dump(recipe))
    whole = train(path, output=tmp_path / "whole", threads=1)
    part = train(path, output=tmp_path / "split", threads=1, stop_at=2)  # a session ends after step 2
    state = json.loads((tmp_path / "split" / RESUME_DIR / "state.json").read_text())
    assert state["step"] == 2 and set(part) == set(whole)
    resumed = train(path, output=tmp_path / "split", threads=1, resume=True)
    assert json.loads((tmp_path / "split" / RESUME_DIR / "state.json").read_text())["step"] == 4
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed == whole


def test_a_recipe_continues_from_the_weights_it_names(tmp_path):
    import torch
    import yaml
    from safetensors.torch import load_file

    from dbtrimkv.recall.recall_model import save_model
    from dbtrimkv.recall.train_model import initial_model

    _, recipe = small_recipe(tmp_path)
    model, processor = build_model(recipe["model"], seed=7)  # not the recipe's seed
    save_model(model, processor, tmp_path / "base")
    loaded, _ = initial_model(dict(recipe, init=str(tmp_path / "base")))
    saved = load_file(tmp_path / "base" / "model.safetensors")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())
    with pytest.raises(FileNotFoundError, match="init"):
        initial_model(dict(recipe, init=str(tmp_path / "missing")))


def test_clip_lengths_are_log_uniform_when_the_mixture_says_so():
    import random

    from dbtrimkv.recall.train_model import _clip_frames

    mixture = {"video_frames": [8, 384], "video_frames_scale": "log"}
    frames = [_clip_frames(random.Random(seed), mixture) for seed in range(2000)]
    assert min(frames) >= 8 and max(frames) <= 384
    short, long = sum(8 <= f < 64 for f in frames), sum(64 <= f <= 384 for f in frames)
    assert abs(short / len(frames) - 0.54) < 0.05 and long > 700  # log(8)..log(64) is 54% of log(8)..log(385)


def test_clip_frame_rates_are_log_uniform_and_absent_without_the_key():
    """`video_fps` [low, high] draws each clip's rate log-uniformly (the timestamps an hour-long video
    carries, on a short clip); a mixture without it draws nothing, so older recipes keep their tasks."""
    import math

    from dbtrimkv.recall.train_model import sample_task

    base = {"video": 1.0, "video_frames": [8, 48], "image_sizes": [32], "max_distractors": 1, "questions": 1}
    plain = [sample_task(seed, base, [4, 8]) for seed in range(300)]
    assert {task.fps for task in plain} == {2.0}
    varied = [sample_task(seed, dict(base, video_fps=[0.01, 2.0]), [4, 8]) for seed in range(300)]
    rates = [task.fps for task in varied]
    assert min(rates) >= 0.01 and max(rates) <= 2.0
    below = sum(math.log(r) < (math.log(0.01) + math.log(2.0)) / 2 for r in rates) / len(rates)
    assert abs(below - 0.5) < 0.1  # log-uniform: half the rates under the geometric mean (0.14 fps)
    assert [t.frames for t in plain] == [t.frames for t in varied]  # the rate is drawn after everything else
