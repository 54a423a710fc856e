"""`dbtrimkv video-qa --save-cache` then `--load-cache`: the same answers, the video never decoded again."""

from __future__ import annotations

import av
import pytest
import torch

from dbtrimkv import cli
from dbtrimkv.cache.portable import read_metadata
from dbtrimkv.video_qa import StreamOptions, VideoQA
from dbtrimkv.video_qa import streaming
from dbtrimkv.video_qa.saved import load_encoded, save_encoded

FLAGS = ["--budget", "48", "--buffer-size", "4", "--prefill-chunk", "8", "--fps", "8", "--window-frames", "4",
         "--max-new-tokens", "4", "--no-progress"]


def _answers(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(("Q: ", "A: "))]


def _no_decoding(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the video was decoded again")

    monkeypatch.setattr(av, "open", boom)
    monkeypatch.setattr(streaming, "iter_video_frames", boom)
    monkeypatch.setattr(streaming, "video_info", boom)


def test_save_then_load_answers_the_same_without_decoding(clips, tmp_path, capsys, monkeypatch):
    saved = tmp_path / "clip.dbkv"
    assert cli.main(["video-qa", "--video", str(clips(8)), "--save-cache", str(saved), *FLAGS,
                     "What happens?", "Is it dark?"]) == 0
    first = capsys.readouterr()
    assert saved.is_file() and f"saved the compressed video cache to {saved}" in first.err
    meta = read_metadata(saved)
    assert meta["extra"]["frames"] == 8 and meta["settings"]["budget"] == 48
    _no_decoding(monkeypatch)
    assert cli.main(["video-qa", "--load-cache", str(saved), "--no-progress", "--max-new-tokens", "4",
                     "Is it dark?", "What happens?"]) == 0
    second = capsys.readouterr()
    want = _answers(first.out)
    assert _answers(second.out) == want[2:] + want[:2]  # same answers, asked in the other order
    assert "video: 8 frames in 4 frame groups" in second.err and "not decoded again" in second.err


def test_python_api_round_trip(gated, clips, tmp_path, monkeypatch):
    model, processor = gated
    qa = VideoQA(model, processor, None, StreamOptions(fps=8, window_frames=4), max_new_tokens=5)
    from dbtrimkv.settings.config import DBTrimKVConfig

    qa.config = DBTrimKVConfig(budget=40, buffer_size=2, prefill_chunk=8, policy="snapkv")
    encoded = qa.encode(clips(12, seed=2))
    path = tmp_path / "v.dbkv"
    assert save_encoded(model, encoded, path) == path.stat().st_size
    _no_decoding(monkeypatch)
    loaded = load_encoded(model, processor, path)
    assert torch.equal(loaded.token_ids, encoded.token_ids)
    assert (loaded.frames, loaded.frame_groups, loaded.prompt_tokens) == (encoded.frames, encoded.frame_groups,
                                                                          encoded.prompt_tokens)
    for question in ("What happens?", "What colour is it?"):
        assert qa.ask(loaded, question).text == qa.ask(encoded, question).text


@pytest.mark.parametrize("args, message", [
    (["--save-cache", "x.dbkv", "q?"], "--save-cache goes with --video"),
    (["--video", "x.mp4", "--save-cache", "UNDERFILE/x.dbkv", "q?"], "is a file, not a folder"),
    (["--video", "x.mp4", "--save-cache", "DIR", "q?"], "it is a folder, not a file"),
    (["--load-cache", "MISSING.dbkv", "q?"], "cache file not found"),
    (["--load-cache", "x.dbkv", "--video", "x.mp4", "q?"], "--load-cache replaces --video"),
    (["--load-cache", "x.dbkv"], "at least one question after --load-cache"),
    (["--load-cache", "JUNK", "q?"], "not a dbtrimkv cache file"),
])
def test_bad_cache_flags_fail_before_the_model_loads(tmp_path, capsys, monkeypatch, args, message):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("dbtrimkv.loading.checkpoints.load_model", no_load)
    (tmp_path / "JUNK").write_bytes(b"not safetensors at all")
    names = {"MISSING.dbkv": tmp_path / "missing.dbkv", "UNDERFILE/x.dbkv": tmp_path / "JUNK" / "x.dbkv",
             "DIR": tmp_path, "JUNK": tmp_path / "JUNK"}
    args = [str(names.get(a, a)) for a in args]
    assert cli.main(["video-qa", *args, "--no-progress"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dbtrimkv: error:")]
    assert len(errors) == 1 and message in errors[0], errors
