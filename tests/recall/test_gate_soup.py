"""`soup_gates`: the shipped tiny-recall gates are (1 - 0.4) x stage 2 + 0.4 x stage 3, bit for bit."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dbtrimkv.errors import CheckpointError, ConfigError
from dbtrimkv.recall.gate_soup import soup_gates

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = "dbtrimkv/assets/tiny-recall/dbtrimkv_gates.safetensors"
STAGE2_COMMIT, STAGE3_COMMIT = "cde79a6", "c58aa33"  # the commits that shipped the stage-2 and stage-3 gates


def _write(path: Path, tensors: dict) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.fixture
def pair(tmp_path):
    gen = torch.Generator().manual_seed(0)
    shared_a, shared_b = torch.randn(2, 4, generator=gen), torch.randn(2, 4, generator=gen)
    a = {"l0.w": torch.randn(3, 5, generator=gen), "l0.tied": shared_a, "l1.tied": shared_a.clone()}
    b = {"l0.w": torch.randn(3, 5, generator=gen), "l0.tied": shared_b, "l1.tied": shared_b.clone()}
    return _write(tmp_path / "a.safetensors", a), _write(tmp_path / "b.safetensors", b), a, b


def test_soup_is_the_elementwise_float32_mix_and_keeps_ties(pair, tmp_path):
    a_path, b_path, a, b = pair
    out = load_file(str(soup_gates(a_path, b_path, 0.4, tmp_path / "s.safetensors")))
    assert out.keys() == a.keys()
    for name in a:
        assert out[name].dtype == torch.float32
        assert torch.equal(out[name], 0.6 * a[name] + 0.4 * b[name])
        assert not torch.equal(out[name], a[name]) and not torch.equal(out[name], b[name])
    assert torch.equal(out["l0.tied"], out["l1.tied"])
    for alpha, same in ((0.0, a), (1.0, b)):  # the ends are the inputs, bit for bit
        ends = load_file(str(soup_gates(a_path, b_path, alpha, tmp_path / "e.safetensors")))
        assert all(torch.equal(ends[k], same[k]) for k in same)


def test_output_may_be_an_input(pair):
    a_path, b_path, a, b = pair
    soup_gates(a_path, b_path, 0.5, b_path)
    assert torch.equal(load_file(str(b_path))["l0.w"], 0.5 * a["l0.w"] + 0.5 * b["l0.w"])


def test_mismatched_or_bad_files_are_refused(pair, tmp_path):
    a_path, b_path, a, _ = pair
    other = _write(tmp_path / "o.safetensors", {"l0.w": a["l0.w"]})
    with pytest.raises(CheckpointError, match="different gate tensors: l0.tied, l1.tied"):
        soup_gates(a_path, other, 0.4, tmp_path / "s.safetensors")
    wide = _write(tmp_path / "w.safetensors", dict(a, **{"l0.w": torch.zeros(3, 6)}))
    with pytest.raises(CheckpointError, match=r"l0.w: \(3, 5\) torch.float32 in .*\(3, 6\)"):
        soup_gates(a_path, wide, 0.4, tmp_path / "s.safetensors")
    nan = _write(tmp_path / "n.safetensors", dict(a, **{"l0.w": torch.full((3, 5), float("nan"))}))
    with pytest.raises(CheckpointError, match="l0.w is not finite"):
        soup_gates(a_path, nan, 0.4, tmp_path / "s.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot read gate weights"):
        soup_gates(junk, a_path, 0.4, tmp_path / "s.safetensors")
    with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\]"):
        soup_gates(a_path, b_path, 1.5, tmp_path / "s.safetensors")
    assert not (tmp_path / "s.safetensors").exists()


def _from_git(commit: str, target: Path) -> Path:
    if shutil.which("git") is None:
        pytest.skip("no git")
    done = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{SHIPPED}"], capture_output=True, timeout=60)
    if done.returncode != 0:
        pytest.skip(f"no git history with commit {commit}")
    target.write_bytes(done.stdout)
    return target


def test_shipped_gates_are_the_soup_of_stage_2_and_stage_3(tmp_path):
    stage2 = _from_git(STAGE2_COMMIT, tmp_path / "stage2.safetensors")
    stage3 = _from_git(STAGE3_COMMIT, tmp_path / "stage3.safetensors")
    soup = soup_gates(stage2, stage3, 0.4, tmp_path / "soup.safetensors")
    assert soup.read_bytes() == (ROOT / SHIPPED).read_bytes()
