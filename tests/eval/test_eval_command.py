"""`dbtrimkv eval synthetic` end to end in a subprocess: JSON, markdown table and plot agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from dbtrimkv.eval.harness import entry_budget


def test_entry_budget_is_a_fraction_of_the_prompt_cache():
    assert entry_budget(0.1, 400, 6) == 240
    assert entry_budget(0.5, 33, 6) == 99
    assert entry_budget(0.001, 100, 6) == 6  # never below one entry per (layer, head)


def test_eval_synthetic_runs_end_to_end(tmp_path):
    """On an untrained recall-architecture model (no trained one ships): the outputs must agree."""
    from dbtrimkv.recall.recall_model import build_model, load_recipe, save_model

    spec = load_recipe()["model"]
    spec["text"].update(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    save_model(*build_model(spec, seed=0), tmp_path / "model")
    prefix = tmp_path / "out" / "recall"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "dbtrimkv.cli", "eval", "synthetic", "--examples", "3", "--num-cards", "3",
         "--filler", "8", "--policies", "global", "streaming", "--budgets", "0.1", "0.5", "--output", str(prefix),
         "--model", str(tmp_path / "model")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(prefix.with_suffix(".json").read_text())
    assert data["command"].startswith("dbtrimkv eval synthetic")
    assert data["spec"]["task"]["num_cards"] == 3 and len(data["examples"]) == 3
    cells = {(r["policy"], r["budget"]): r for r in data["results"]}
    assert set(cells) == {("full", None), ("global", 0.1), ("global", 0.5), ("streaming", 0.1), ("streaming", 0.5)}
    for (policy, budget), cell in cells.items():
        key = "full" if policy == "full" else f"{policy}@{budget}"
        correct = sum(row[key] == row["answer"] for row in data["examples"])
        assert cell["correct"] == correct and cell["accuracy"] == correct / 3
    assert data["gates_trained"] is False and "untrained retention gates" in result.stderr
    table = prefix.with_suffix(".md").read_text()
    assert "| full cache |" in table and "| streaming |" in table and "| 0.1 | 0.5 |" in table
    streaming = next(line for line in table.splitlines() if line.startswith("| streaming |"))
    assert streaming.split("|")[2].strip() == f"{100 * cells[('streaming', 0.1)]['accuracy']:.0f}"
    assert prefix.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(prefix.with_suffix(".json")) in result.stdout


def test_bad_budget_is_one_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dbtrimkv.cli", "eval", "synthetic", "--budgets", "2",
                             "--output", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "dbtrimkv: error:" in result.stderr and "Traceback" not in result.stderr


def test_train_recall_on_a_missing_gpu_is_one_clear_error(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = subprocess.run([sys.executable, "-m", "dbtrimkv.cli", "eval", "train-recall", "--device", "cuda",
                             "--output", str(tmp_path / "m")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "CUDA is not available" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m").exists()


def test_threshold_runs_with_its_tau_and_each_budget_as_its_cap(monkeypatch):
    """`--policies threshold --threshold TAU`: every threshold answer is made with that tau and the grid's
    budget (the harness also checks the bound); the other policies get no tau."""
    from dbtrimkv.eval import harness

    seen, real = [], harness.answer

    def spy(model, processor, inputs, config):
        seen.append((config.policy, config.threshold, config.budget))
        return real(model, processor, inputs, config)

    monkeypatch.setattr(harness, "answer", spy)
    spec = harness.BenchmarkSpec(kind="cards", task=dict(num_cards=2, filler=8), examples=2,
                                 policies=["global", "threshold"], budgets=[0.25, 0.5], threshold=0.5)
    out = harness.run_benchmark(spec)
    by_policy = {}
    for policy, tau, budget in seen:
        by_policy.setdefault(policy, []).append((tau, budget))
    assert [tau for tau, _ in by_policy["threshold"]] == [0.5] * 4
    assert all(tau is None for tau, _ in by_policy["global"])  # the full cache and the global runs
    assert [b for _, b in by_policy["threshold"]] == [b for _, b in by_policy["global"] if b is not None]
    assert all(b is not None for _, b in by_policy["threshold"])
    rows = [r for r in out["results"] if r["policy"] == "threshold"]
    assert [r["budget"] for r in rows] == [0.25, 0.5] and all(r["examples"] == 2 for r in rows)
    assert out["spec"]["threshold"] == 0.5


def test_threshold_and_its_tau_go_together(tmp_path):
    for flags, message in ((["--policies", "threshold"], "needs its tau"),
                           (["--policies", "global", "--threshold", "0.5"], "add threshold to --policies")):
        result = subprocess.run([sys.executable, "-m", "dbtrimkv.cli", "eval", "synthetic", *flags,
                                 "--output", str(tmp_path / "t")], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.startswith("dbtrimkv: error:") and message in result.stderr


def test_a_recall_task_parameter_the_task_refuses_is_one_clear_error_before_loading(monkeypatch, capsys):
    """`--image-size 8` passes the flag's range but the recall task needs >= 32: one error line, exit 2,
    before any model loads (it used to end in a raw ValueError after loading)."""
    from dbtrimkv.cli import main
    from dbtrimkv.eval import harness

    def no_run(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(harness, "run_benchmark", no_run)
    monkeypatch.setattr("dbtrimkv.loading.checkpoints.load_model", no_run)
    for kind, rule in (("cards", "image_size must be >= 32, filler and distractors >= 0"),
                       ("video", "frames must be >= 2, image_size >= 32, filler >= 0"),
                       ("image", "image_size must be >= 32, filler >= 0")):
        assert main(["eval", "synthetic", "--kind", kind, "--image-size", "8"]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"dbtrimkv: error: recall task: {rule}"]


def test_the_calibration_flags_reach_the_bounded_runs_only(monkeypatch):
    """`--video-decay-scale` / `--decay-floor`: every bounded answer is made with them, the full cache without."""
    import argparse

    from dbtrimkv.cli import build_parser
    from dbtrimkv.eval import harness

    seen = []

    def spy(model, processor, inputs, config):
        seen.append((config.budget, config.video_decay_scale, config.decay_floor))
        return "K7", 1

    monkeypatch.setattr(harness, "answer", spy)
    args = build_parser().parse_args(["eval", "synthetic", "--policies", "global", "head", "--budgets", "0.25",
                                      "--num-cards", "2", "--filler", "8", "--examples", "2",
                                      "--video-decay-scale", "0.5", "--decay-floor", "0.01"])
    spec = harness.BenchmarkSpec.from_args(args)
    assert spec.calibration == {"video_decay_scale": 0.5, "decay_floor": 0.01}
    harness.run_benchmark(spec)
    assert len(seen) == 2 * 3  # per prompt: the full cache, global, head
    assert all((scale, floor) == (1.0, 0.0) for budget, scale, floor in seen if budget is None)
    assert [(scale, floor) for budget, scale, floor in seen if budget is not None] == [(0.5, 0.01)] * 4
    plain = build_parser().parse_args(["eval", "synthetic"])
    assert (plain.video_decay_scale, plain.decay_floor) == (1.0, 0.0)  # off unless asked for
    lmms = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("video_decay_scale", "decay_floor")})
    assert harness.BenchmarkSpec.from_args(lmms).calibration == {}  # export-lmms has no such flags
