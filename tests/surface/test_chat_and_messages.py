"""chat and the error messages (issue 27, item 4): /stats after /reset, /image checked at once, an
empty question refused, an empty answer shown, --no-progress and no bars off a terminal, errors that
name the flags and the --config file, `--config bogus` listing eviction presets only."""

from __future__ import annotations

import argparse
import builtins
import io
import os
import sys

import pytest
from cli_harness import assert_one_clear_error, run_cli

from dbtrimkv.commands import chat
from dbtrimkv.commands.common import show_progress
from dbtrimkv.pipeline import StreamingOutput

DIGIT = "demos/examples/digit-911.png"


def test_an_empty_question_is_refused_before_the_model(no_work):
    assert "the question is empty" in assert_one_clear_error(["chat", ""])
    assert "the question is empty" in assert_one_clear_error(["chat", "   "])


class _FakeConversation:
    def __init__(self, answers):
        self.answers, self.sent = answers, []

    def send(self, text, images=(), videos=(), **options):
        self.sent.append((text, list(images), list(videos), options))
        return StreamingOutput(iter(self.answers.pop(0)), lambda: _Stats(len(self.sent)))


class _Stats:
    def __init__(self, turn):
        self.turn = turn

    def summary(self):
        return f"stats of turn {self.turn}"


class _FakePipe:
    def __init__(self, answers):
        self.answers, self.conversations = answers, []

    def conversation(self):
        self.conversations.append(_FakeConversation(self.answers))
        return self.conversations[-1]


def _interact(monkeypatch, capsys, lines, answers, options=None):
    feed = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    pipe = _FakePipe(answers)
    assert chat.interactive(pipe, [], [], options or {}) == 0
    out, err = capsys.readouterr()
    return pipe, out, err


def test_stats_after_reset_show_the_new_conversation(monkeypatch, capsys):
    pipe, _, err = _interact(monkeypatch, capsys, ["hello", "/stats", "/reset", "/stats"], [["hi"]])
    first, after = err.split("new conversation: history, KV cache and attachments cleared")
    assert "stats of turn 1" in first and "stats of turn 1" not in after
    assert "new conversation: no answer yet, KV cache empty" in after and len(pipe.conversations) == 2


def test_image_is_checked_at_once_and_confirmed(monkeypatch, capsys):
    lines = [f"/image {DIGIT}", "/image no/such.png", "/video no/such.mp4", "which digit?"]
    pipe, _, err = _interact(monkeypatch, capsys, lines, [["image:7"]])
    assert f"attached image {DIGIT} to the next message" in err
    assert "image not found: no/such.png; nothing attached" in err and "video not found: no/such.mp4" in err
    (sent,) = pipe.conversations[0].sent
    assert sent[:3] == ("which digit?", [DIGIT], [])  # only the good path went with the message


def test_an_empty_answer_is_shown(monkeypatch, capsys):
    _, out, _ = _interact(monkeypatch, capsys, ["hello", "again"], [[], ["", "  "]])
    assert out.count("(empty answer)\n") == 2 and out.startswith("assistant> (empty answer)\n")  # blank: visible too


def test_an_empty_single_answer_is_shown(monkeypatch, capsys):
    class Pipe:
        def chat(self, question, **kwargs):
            Pipe.kwargs = kwargs
            return type("Out", (), {"text": "", "stats": _Stats(1), "cache": None})()

    monkeypatch.setattr(chat, "load_pipeline", lambda args: Pipe())
    args = chat_args(["hello"])
    assert chat.run(args) == 0
    assert capsys.readouterr().out == "(empty answer)\n"
    assert Pipe.kwargs["progress"] is False  # stderr is not a terminal here: no bars


def chat_args(argv):
    from dbtrimkv.cli import build_parser

    return build_parser().parse_args(["chat", *argv])


def test_no_bars_off_a_terminal_or_with_no_progress(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or a log file
    assert show_progress(argparse.Namespace(no_progress=False)) is False and os.environ["TQDM_DISABLE"] == "1"

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert show_progress(argparse.Namespace(no_progress=False)) is True
    assert show_progress(argparse.Namespace(no_progress=True)) is False


@pytest.mark.parametrize("command", [["chat", "q"], ["video-qa", "--video", "v.mp4", "q"], ["demo"], ["serve"],
                                     ["eval", "synthetic"], ["eval", "long-video"],
                                     ["watch", "src"]])
def test_every_command_that_can_draw_bars_takes_no_progress(command):
    from dbtrimkv.cli import build_parser

    assert build_parser().parse_args([*command, "--no-progress"]).no_progress is True


@pytest.mark.parametrize("argv, wanted, unwanted", [
    (["--budget", "5", "--memory-size", "3"], ["--budget", "--memory-size"], ["memory_size"]),
    (["--full-cache", "--budget", "5"], ["--full-cache", "--budget"], ["--memory-size"]),
    (["--full-cache", "--memory-size", "3"], ["--full-cache", "--memory-size"], ["--budget"]),
    (["--policy", "threshold"], ["--threshold"], ["got None"]),
    (["--threshold", "0.5"], ["--threshold is only used by --policy threshold"], []),
    (["--policy-option", "tau=0.3"], ["--threshold TAU", "--policy-option"], []),
    (["--policy", "threshold", "--threshold", "0.5", "--policy-option", "x=1"], ["--threshold TAU"],
     ["threshold (default None)"]),
])
def test_setting_errors_name_the_flags(argv, wanted, unwanted, no_work):
    line = assert_one_clear_error(["chat", *argv, "q"])
    assert all(w in line for w in wanted) and not any(u in line for u in unwanted), line


def test_a_bad_config_file_is_named(tmp_path, no_work):
    bad = tmp_path / "settings.yaml"
    bad.write_text("eviction:\n  budget: -1\n")
    line = assert_one_clear_error(["chat", "--config", str(bad), "q"])
    assert str(bad) in line and "budget must be a positive integer" in line
    bad.write_text("eviction:\n  budgett: 5\n")
    assert str(bad) in assert_one_clear_error(["chat", "--config", str(bad), "q"])
    # a file that only works with the flags is fine: it chooses the policy, the command line gives tau
    (tmp_path / "t.yaml").write_text("eviction:\n  policy: threshold\n")
    code, _, err = run_cli(["chat", "--config", str(tmp_path / "t.yaml"), "--threshold", "0.3", "q"])
    assert "--config" not in err and "work started" in err  # past the checks, into the (refused) model load


def test_config_bogus_lists_eviction_presets_only(no_work):
    line = assert_one_clear_error(["chat", "--config", "bogus", "q"])
    assert "budget-tight" in line and "default" in line
    assert not any(recipe in line for recipe in ("recall-tiny", "train-tiny", "train-recall-gates", "tiny-qwen3-vl"))
