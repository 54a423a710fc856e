"""`dbtrimkv train` in a subprocess: the tiny recipe runs, bad settings give one clear error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dbtrimkv.cli import main


def run_cli(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "dbtrimkv.cli", "train", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_tiny_recipe_runs(tmp_path):
    output = tmp_path / "gates"
    result = run_cli("--config", "configs/train-tiny.yaml", "--max-steps", "3", "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert "step 3/3 |" in result.stdout and "S/M" in result.stdout
    record = json.loads((output / "train_log.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 3 and record["capacity"] > 0
    assert (output / "dbtrimkv_gates.safetensors").is_file() and (output / "released" / "trimkv_weights.pth").is_file()
    assert (output / "checkpoints" / "step-0000003" / "trainer_state.json").is_file()
    assert "Traceback" not in result.stderr


def write_config(tmp_path, extra: str):
    config = tmp_path / "bad.yaml"
    config.write_text("model: tiny\nsynthetic_examples: 4\n" + extra)
    return str(config)


def test_bad_config_gives_one_clear_line(tmp_path):
    result = run_cli("--config", write_config(tmp_path, "lr: -1\n"), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("dbtrimkv: error:")]
    assert len(errors) == 1 and "lr and video_fps must be positive" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("extra, args, message", [
    ("capacity: layer\n", [], "capacity must be one of head, global"),
    ("learning_rate: 0.1\n", [], "unknown setting(s) learning_rate"),
    ("memory_size: lots\n", [], "memory_size must be int"),
    ("", ["--max-steps", "0"], "max_steps must be at least 1"),
    ("model: tiny-text\npacking: false\nattention: flex\n", [], "flex needs CUDA"),
    ("packing: true\n", [], "packing is for text-only models"),
    (None, [], "cannot read training config"),
    ("", ["--resume"], "no checkpoint under"),
])
def test_bad_settings_in_process(tmp_path, capsys, extra, args, message):
    config = str(tmp_path / "missing.yaml") if extra is None else write_config(tmp_path, extra)
    assert main(["train", "--config", config, "--output", str(tmp_path / "out"), *args]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dbtrimkv: error:")]
    assert len(errors) == 1 and message in errors[0], errors
