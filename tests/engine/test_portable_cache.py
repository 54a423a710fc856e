"""A saved compressed cache loads back to give identical next tokens; a wrong file is refused clearly.

Every policy, image and video prompts, float32 and bfloat16: the original cache and the loaded one
answer the same next turn (greedy), evicting on the way, and end with the same entries.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import image_chat, random_image, randomize_gates, video_chat
from safetensors.torch import load_file, save_file

import dbtrimkv
from dbtrimkv.cache.portable import FORMAT_VERSION, METADATA_KEY, load_cache, read_metadata, save_cache
from dbtrimkv.settings.config import DBTrimKVConfig
from dbtrimkv.errors import CacheFileError, CacheMismatchError, ConfigError
from dbtrimkv.generation import generate
from dbtrimkv.policies import policy_names
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.loading.tiny import build_tiny

GREEDY = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def _model(dtype, seed=0):
    model, processor = build_tiny("qwen3_vl", dtype=dtype)
    dbtrimkv.attach_retention_gates(model, intermediate_size=32)
    randomize_gates(model, seed=seed)
    return model, processor


@pytest.fixture(scope="module")
def models():
    return {dtype: _model(dtype) for dtype in (torch.float32, torch.bfloat16)}


def _config(policy: str) -> DBTrimKVConfig:
    extra = {"threshold": 0.3} if policy == "threshold" else {}
    return DBTrimKVConfig(budget=48, buffer_size=2, prefill_chunk=8, policy=policy, **extra)


def _chat(kind: str):
    if kind == "image":
        return image_chat(random_image(5), "What is in the picture?")
    return video_chat([random_image(30 + i, 48, 64) for i in range(4)], "What happens?")


def _state(cache):
    return ([[p.tolist() for p in layer] for layer in cache.retained_positions(0)], cache.seen, cache.columns,
            cache.num_evictions)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("policy", policy_names())
def test_saved_cache_continues_identically(models, tmp_path, policy, kind, dtype):
    model, processor = models[dtype]
    cache = dbtrimkv.DBTrimKVCache(model, _config(policy))
    generate(model, build_inputs(processor, _chat(kind)), cache, max_new_tokens=4, **GREEDY)
    path = tmp_path / "c.dbkv"
    size = save_cache(model, cache, path, extra={"note": "hi"})
    assert size == path.stat().st_size
    loaded, extra = load_cache(model, path)
    assert extra == {"note": "hi"} and loaded is not cache
    assert _state(loaded) == _state(cache)
    # entries the saved file holds: only the kept ones
    assert load_file(path)["k"].shape[0] == cache.num_entries(0)
    follow = build_inputs(processor, "Tell me more about it, please, in detail.")
    evictions = cache.num_evictions
    want = generate(model, follow, cache, max_new_tokens=8, **GREEDY)
    got = generate(model, follow, loaded, max_new_tokens=8, **GREEDY)
    assert cache.num_evictions > evictions  # the continuation evicted: the policy's state mattered
    assert got.tolist() == want.tolist()
    assert _state(loaded) == _state(cache)


def test_a_conversation_saved_and_loaded_answers_the_same(models, tmp_path):
    model, processor = models[torch.float32]
    pipe = dbtrimkv.DBTrimKVPipeline(model, processor, _config("global"))
    conv = pipe.conversation(system="Be brief.")
    conv.send("Hello there", images=[random_image(2)], max_new_tokens=4, progress=False)
    path = tmp_path / "conv.dbkv"
    conv.save(path)
    again = pipe.load_conversation(path)
    assert again.turns == 1 and again.messages[0] == {"role": "system", "content": "Be brief."}
    want = conv.send("And then?", max_new_tokens=6, progress=False)
    got = again.send("And then?", max_new_tokens=6, progress=False)
    assert got.token_ids == want.token_ids and got.text == want.text


def test_the_pending_token_is_kept_in_the_sequences_row_and_travels_with_it(models, tmp_path):
    """A reply's last token is never fed; the sequence's row keeps it (`SequenceState.pending`), the next
    `generate` feeds it first and hands it over, and a saved cache carries it in its rows. A file written
    before rows kept it (its known tokens past the columns processed) gets it back from those."""
    model, processor = models[torch.float32]
    cache = dbtrimkv.DBTrimKVCache(model, _config("global"))
    first = generate(model, build_inputs(processor, "Hello"), cache, max_new_tokens=3, **GREEDY)
    assert cache.requests[0].pending == (first[0, -1].item(),)
    assert cache.seen[0] == cache.known_tokens(1, "cpu")[1].sum().item() - 1  # processed all but the pending one
    path = tmp_path / "c.dbkv"
    save_cache(model, cache, path)
    assert read_metadata(path)["rows"][0]["pending"] == [first[0, -1].item()]
    old = tmp_path / "old.dbkv"
    old.write_bytes(path.read_bytes())
    _rewrite(old, lambda meta, tensors: [row.pop("pending") for row in meta["rows"]])
    follow = build_inputs(processor, "And then?")
    loaded, older = load_cache(model, path)[0], load_cache(model, old)[0]
    assert loaded.requests[0].pending == older.requests[0].pending == cache.requests[0].pending
    seen = cache.seen[0]
    want = generate(model, follow, cache, max_new_tokens=4, **GREEDY)
    assert cache.seen[0] == seen + 1 + follow["input_ids"].shape[1] + 3  # the pending token was fed first
    assert cache.requests[0].pending == (want[0, -1].item(),)  # and replaced by the new reply's
    assert generate(model, follow, loaded, max_new_tokens=4, **GREEDY).tolist() == want.tolist()
    assert generate(model, follow, older, max_new_tokens=4, **GREEDY).tolist() == want.tolist()


def _saved(models, tmp_path, dtype=torch.float32):
    model, processor = models[dtype]
    cache = dbtrimkv.DBTrimKVCache(model, _config("global"))
    generate(model, build_inputs(processor, "Hello"), cache, max_new_tokens=2, **GREEDY)
    path = tmp_path / "c.dbkv"
    save_cache(model, cache, path)
    return path


def test_dtype_mismatch_is_refused(models, tmp_path):
    path = _saved(models, tmp_path, torch.float32)
    with pytest.raises(CacheMismatchError, match="dtype 'float32'.*'bfloat16'"):
        load_cache(models[torch.bfloat16][0], path)


def test_other_weights_are_refused(models, tmp_path):
    path = _saved(models, tmp_path)
    other, _ = _model(torch.float32, seed=7)  # same shapes, other gates
    with pytest.raises(CacheMismatchError, match="another model"):
        load_cache(other, path)


def test_other_architecture_is_refused(models, tmp_path):
    path = _saved(models, tmp_path)
    text, _ = build_tiny("qwen3")
    dbtrimkv.attach_retention_gates(text, intermediate_size=8)
    meta, model_meta = read_metadata(path), dbtrimkv.cache.portable.ModelIdentity.of(text)
    with pytest.raises(CacheMismatchError, match="load it into the model it was saved from"):
        load_cache(text, path)
    assert meta["model"] != model_meta.__dict__


def _rewrite(path, change):
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()[METADATA_KEY])
    change(meta, tensors)
    save_file(tensors, path, metadata={METADATA_KEY: json.dumps(meta)})


@pytest.mark.parametrize("change, message", [
    (lambda m, t: m.update(version=FORMAT_VERSION + 1), "format version"),
    (lambda m, t: m.update(format="other"), "not a dbtrimkv cache"),
    (lambda m, t: t.update(k=t["k"][:-1]), "wrong shape"),
    (lambda m, t: t.update(slot_ids=torch.zeros_like(t["slot_ids"])), "partition"),
    (lambda m, t: t.update(seg_len=torch.cat([t["seg_len"], torch.zeros(1, dtype=torch.int64)])), "segments for"),
    (lambda m, t: m["settings"].update(budget=-3), "bad eviction settings"),
])
def test_corrupt_or_foreign_files_are_refused(models, tmp_path, change, message):
    path = _saved(models, tmp_path)
    _rewrite(path, change)
    with pytest.raises(CacheFileError, match=message):
        load_cache(models[torch.float32][0], path)


def test_not_a_cache_file(models, tmp_path):
    model = models[torch.float32][0]
    junk = tmp_path / "junk.dbkv"
    junk.write_bytes(b"\x80\x04K\x01.")  # a pickle is never unpickled
    with pytest.raises(CacheFileError, match="not a dbtrimkv cache file"):
        load_cache(model, junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, plain)
    with pytest.raises(CacheFileError, match="no 'dbtrimkv' metadata"):
        load_cache(model, plain)
    with pytest.raises(CacheFileError, match="not found"):
        load_cache(model, tmp_path / "missing.dbkv")


def test_bad_arguments_to_save_and_load_are_one_clear_error(models, tmp_path):
    model = models[torch.float32][0]
    path = _saved(models, tmp_path)
    cache, _ = load_cache(model, path)
    for bad_path, message in [(None, "must be a non-empty string or a Path, got NoneType"), (5, "got int"),
                              ("", "non-empty"), (tmp_path, "is a folder")]:
        with pytest.raises(CacheFileError, match=message):
            save_cache(model, cache, bad_path)
        if bad_path is not tmp_path:
            with pytest.raises(CacheFileError, match=message):
                load_cache(model, bad_path)
    with pytest.raises(CacheFileError, match="is a folder"):
        load_cache(model, tmp_path)
    with pytest.raises(ConfigError, match="needs a DBTrimKVCache, got NoneType"):
        save_cache(model, None, tmp_path / "x.dbkv")
    with pytest.raises(ConfigError, match="pass the model, got NoneType"):
        save_cache(None, cache, tmp_path / "x.dbkv")
    with pytest.raises(ConfigError, match="pass the model, got NoneType"):
        load_cache(None, path)
    with pytest.raises(ConfigError, match="extra must be a JSON-able dict"):
        save_cache(model, cache, tmp_path / "x.dbkv", extra={"a": {1, 2}})
    with pytest.raises(ConfigError, match="extra must be a JSON-able dict, got list"):
        save_cache(model, cache, tmp_path / "x.dbkv", extra=[1])
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(CacheFileError, match="cannot write"):
        save_cache(model, cache, blocker / "sub" / "x.dbkv")
    assert not list(tmp_path.glob("**/.x.dbkv*.tmp"))  # no temporary file left behind
