"""End-to-end gate training on the tiny models: it learns, it saves, it loads, it resumes exactly."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from training_helpers import tiny_config

import dbtrimkv
from dbtrimkv.modeling.gates import gate_outputs, text_config_of
from dbtrimkv.modeling.model_state import model_state
from dbtrimkv.training import train
from dbtrimkv.training.run_checkpoints import checkpoint_dir

METRICS = ("loss", "kl", "ntp", "capacity", "mass_ratio")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """100 steps of configs/train-tiny.yaml (M = 8, global capacity), every step logged."""
    output = tmp_path_factory.mktemp("run")
    return train(tiny_config(output_dir=str(output), max_steps=100, log_every=1, save_every=0))


def mean(records, key):
    return sum(r[key] for r in records) / len(records)


def test_training_lowers_the_loss_and_brings_the_mass_under_budget(trained):
    records = trained.records
    assert [r["step"] for r in records] == list(range(1, 101))
    first, last = records[:10], records[-10:]
    assert records[0]["mass_ratio"] > 1.5  # fresh gates keep almost everything: S_t well above M
    assert mean(last, "mass_ratio") < 1.0
    assert mean(last, "loss") < mean(first, "loss") - 0.3
    assert mean(last, "capacity") < 0.1 * mean(first, "capacity")
    assert all(r["kl"] >= 0 and r["ntp"] > 0 and r["tokens"] > 0 for r in records)


def test_saved_gates_load_with_identical_outputs(trained):
    hidden = torch.randn(2, 5, text_config_of(trained.model).hidden_size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = gate_outputs(trained.model, hidden)
        for directory in (trained.output_dir, trained.output_dir / "released"):
            loaded, _ = dbtrimkv.load_model(directory)
            assert torch.equal(gate_outputs(loaded, hidden), expected), directory
    fresh, _ = dbtrimkv.load_model("tiny")
    with torch.no_grad():
        assert not torch.allclose(gate_outputs(fresh, hidden), expected, atol=1e-3)  # training changed the gates
    eviction = model_state(loaded).default_eviction
    assert (eviction.memory_size, eviction.policy) == (8, "global")


def test_resume_continues_exactly(tmp_path):
    config = tiny_config(max_steps=6, save_every=3, log_every=1, output_dir=str(tmp_path / "a"))
    whole = train(config)
    resumed = train(dataclasses.replace(config, output_dir=str(tmp_path / "b")),
                    resume=str(checkpoint_dir(tmp_path / "a", 3)))
    assert [r["step"] for r in resumed.records] == [4, 5, 6] and resumed.step == 6
    for mine, reference in zip(resumed.records, whole.records[3:]):
        for key in METRICS + ("lr",):
            assert mine[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-9), (mine["step"], key)
    stale = tmp_path / "b" / "checkpoints" / "step-0000099.tmp"  # what a crash mid-save leaves behind
    shutil.copytree(checkpoint_dir(tmp_path / "b", 6), stale)
    longer = train(dataclasses.replace(config, output_dir=str(tmp_path / "b"), max_steps=8), resume="latest")
    assert [r["step"] for r in longer.records] == [7, 8]
    log = (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 5  # steps 4-6, then 7-8 appended


def test_packed_text_training_with_accumulation(tmp_path):
    config = tiny_config(model="tiny-text", packing=True, max_length=256, grad_accum_steps=2, batch_size=2,
                         max_steps=3, log_every=1, save_every=0, export_released=False,
                         output_dir=str(tmp_path / "text"))
    result = train(config)
    assert [r["step"] for r in result.records] == [1, 2, 3]
    assert all(r["capacity"] > 0 and r["tokens"] > 200 for r in result.records)
    assert dbtrimkv.load_model(result.output_dir)[0].config.model_type == "qwen3"
