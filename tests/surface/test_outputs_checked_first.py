"""Outputs (issue 27, item 2): `dbtrimkv eval` never writes into the project unasked, and every output
path of every command is checked writable before any work starts (one error line, exit 2)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from cli_harness import assert_one_clear_error, run_cli

from dbtrimkv.errors import ConfigError
from dbtrimkv.reporting.output_paths import check_writable_dir, check_writable_file, timestamped

UNWRITABLE = "/proc/x/y"  # /proc takes no new files, even for root


@pytest.mark.parametrize("argv", [
    ["eval", "synthetic", "--output", UNWRITABLE],
    ["eval", "long-video", "--output", UNWRITABLE],
    ["eval", "long-video", "--minutes", "1", "--timeline-minutes", "1", "--output", "/proc/lv"],
    ["eval", "train-recall", "--output", UNWRITABLE],
    ["train", "--config", "train-tiny", "--output", UNWRITABLE],
    ["video-qa", "--dataset", "d.jsonl", "--format", "jsonl", "--output", UNWRITABLE + ".jsonl"],
    ["chat", "--retention-plot", "/proc/plot.png", "q"],
    ["video-qa", "--video", "v.mp4", "--retention-plot", "/proc/plot.png", "q"],
])
def test_an_unwritable_output_fails_before_any_work(argv, no_work):
    line = assert_one_clear_error(argv)
    assert "cannot write" in line and ("/proc" in line), line


def test_eval_writes_to_the_working_directory_by_default(tmp_path, monkeypatch):
    from dbtrimkv.eval import harness, report

    written = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(harness, "run_benchmark", lambda *a, **k: {"fake": True})
    monkeypatch.setattr(report, "write_report", lambda results, prefix, command: written.append(prefix) or [])
    code, _, err = run_cli(["eval", "synthetic", "--examples", "1"])
    assert code == 0, err
    (prefix,) = written
    assert re.fullmatch(r"synthetic_recall-\d{8}-\d{6}", prefix), prefix  # says what and when, relative: the cwd
    assert not (Path.cwd() / "bench").exists()


def test_the_default_output_help_says_where(capsys):
    from dbtrimkv.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "synthetic", "--help"])
    assert "working directory" in " ".join(capsys.readouterr().out.split())


def test_the_checks(tmp_path):
    assert check_writable_file(tmp_path / "new" / "deeper" / "out.json", "--output") == \
        tmp_path / "new" / "deeper" / "out.json"
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind, not even the folders
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConfigError, match="it is a folder"):
        check_writable_file(tmp_path / "folder", "--output")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_writable_file(tmp_path / "file" / "out.json", "--output")
    with pytest.raises(ConfigError, match="it is a file, not a folder"):
        check_writable_dir(tmp_path / "file", "--output")
    assert check_writable_dir(tmp_path / "d", "--output") == tmp_path / "d"
    assert (tmp_path / "file").read_text() == "x"  # an existing file is probed, not changed
    with pytest.raises(ConfigError, match="--output is empty"):
        check_writable_file("", "--output")
    assert re.fullmatch(r"what-\d{8}-\d{6}", timestamped("what"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="cannot create files in"):
            check_writable_file(tmp_path / "out.json", "--output")
    finally:
        tmp_path.chmod(0o700)


def test_train_gates_checks_where_it_will_write(tmp_path, monkeypatch, no_work):
    import dbtrimkv.recall.train_gates

    monkeypatch.setattr(dbtrimkv.recall.train_gates, "train_gates", lambda *a, **k: pytest.fail("training started"))
    config = tmp_path / "gates.yaml"
    config.write_text("output_dir: /proc/gates\n")
    line = assert_one_clear_error(["eval", "train-gates", "--config", str(config)])
    assert "cannot write the output_dir of" in line and "/proc/gates" in line


def test_soup_gates_checks_its_output_first_and_names_bad_inputs(tmp_path):
    missing = tmp_path / "missing.safetensors"
    line = assert_one_clear_error(["eval", "soup-gates", str(missing), str(missing), "--alpha", "0.4",
                                   "--output", "/proc/soup.safetensors"])
    assert "cannot write --output" in line and "/proc/soup.safetensors" in line  # before reading any input
    line = assert_one_clear_error(["eval", "soup-gates", str(missing), str(missing), "--alpha", "0.4",
                                   "--output", str(tmp_path / "out.safetensors")])
    assert "cannot read gate weights" in line and str(missing) in line
    line = assert_one_clear_error(["eval", "soup-gates", "a", "b", "--alpha", "1.5", "--output", "o"])
    assert "--alpha" in line
