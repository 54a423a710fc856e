"""`dbtrimkv serve --session-store DIR`: sessions spill to disk when they must leave the pool (count, room,
shutdown) and resume from it without prefilling their history again, with the answers they would have given."""

from __future__ import annotations

import pytest

from dbtrimkv import cli
from dbtrimkv.cache.portable import ModelIdentity, read_metadata, read_saved
from serving_helpers import EXAMPLES, image_message, start_server

KV = ("bytes", 2 * 2**20)
SNAPKV = {"eviction": {"policy": "snapkv"}}


def ask(client, messages, session, **extra):
    return client.chat.completions.create(model="tiny-recall", messages=messages, temperature=0, max_tokens=12,
                                          extra_body={"session_id": session, **extra})


def turn_two(history, first):
    return history + [{"role": "assistant", "content": first.choices[0].message.content},
                      {"role": "user", "content": "which digit is in the image? say it again"}]


def new_tokens(pipeline, history) -> int:
    """Tokens a continued session prefills: end-of-turn, newline, the new user turn."""
    turn = pipeline.build_inputs([history[-1]])["input_ids"].shape[1]
    return 1 + len(pipeline.tokenizer.encode("\n", add_special_tokens=False)) + turn


@pytest.fixture(scope="module")
def reference(recall_pipeline):
    """Turn-two answers of a server without a store, sessions never leaving the pool."""
    server = start_server(recall_pipeline, kv_memory=KV, max_sessions=8)
    try:
        client, out = server.openai(), {}
        for name, digit, extra in (("a", "digit-913.png", {}), ("b", "digit-911.png", SNAPKV)):
            history = image_message(digit)
            first = ask(client, history, f"ref-{name}", **extra)
            out[name] = ask(client, turn_two(history, first), f"ref-{name}", **extra).choices[0].message.content
        return out
    finally:
        server.close()


def test_spilled_session_resumes_without_prefill(recall_pipeline, reference, tmp_path):
    store = tmp_path / "sessions"
    server = start_server(recall_pipeline, kv_memory=KV, max_sessions=1, session_store=store)
    try:
        client = server.openai()
        history_a = image_message("digit-913.png")
        first_a = ask(client, history_a, "a")
        first_b = ask(client, image_message("digit-911.png"), "b", **SNAPKV)  # max 1 session: "a" spills
        m = server.wait_idle()
        assert m["dbtrimkv_sessions_spilled_total"] == 1 and m["dbtrimkv_sessions_parked"] == 1
        files = list(store.glob("*.dbkv"))
        assert len(files) == 1 and read_metadata(files[0])["extra"]["id"] == "a"
        before = m["dbtrimkv_prompt_tokens_total"]
        history_a = turn_two(history_a, first_a)
        second = ask(client, history_a, "a")
        m = server.wait_idle()
        assert m["dbtrimkv_sessions_restored_total"] == 1
        assert m["dbtrimkv_prompt_tokens_total"] - before == new_tokens(recall_pipeline, history_a)  # no re-prefill
        assert second.usage.prompt_tokens_details.cached_tokens == (first_a.usage.prompt_tokens
                                                                    + first_a.usage.completion_tokens - 1)
        assert "notice" not in second.model_extra["dbtrimkv"]
        assert second.choices[0].message.content == reference["a"]
    finally:
        server.close()  # stops: "a" (parked again) and whatever is in the pool spill
    assert len(list(store.glob("*.dbkv"))) == 2
    # the session's row keeps its reply's pending token; a file of the older format (the reply's ids in
    # `extra["last_ids"]`, rows without `pending`) is read as it was meant
    (file_b,) = [f for f in store.glob("*.dbkv") if read_metadata(f)["extra"]["id"] == "b"]
    meta = read_metadata(file_b)
    (pending,) = meta["rows"][0]["pending"]
    assert "last_ids" not in meta["extra"]
    _rewrite_metadata(file_b, lambda m: (m["rows"][0].pop("pending"), m["extra"].update(last_ids=[7, pending])))
    assert read_saved(file_b, ModelIdentity.of(recall_pipeline.model)).rows()[0].pending == (pending,)

    # a new server on the same store resumes "b" (SnapKV statistics included) without prefilling it again
    server = start_server(recall_pipeline, kv_memory=KV, max_sessions=4, session_store=store)
    try:
        history_b = turn_two(image_message("digit-911.png"), first_b)
        second_b = ask(server.openai(), history_b, "b", **SNAPKV)
        m = server.wait_idle()
        assert m["dbtrimkv_sessions_restored_total"] == 1
        assert m["dbtrimkv_prompt_tokens_total"] == new_tokens(recall_pipeline, history_b)
        assert second_b.choices[0].message.content == reference["b"]
    finally:
        server.close()


def _rewrite_metadata(path, change):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from dbtrimkv.cache.portable import METADATA_KEY

    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()[METADATA_KEY])
    change(meta)
    save_file(tensors, path, metadata={METADATA_KEY: json.dumps(meta)})


def test_session_store_flag_is_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("dbtrimkv.loading.checkpoints.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    assert cli.main(["serve", "--session-store", str(not_a_folder)]) == 2
    assert "--session-store" in capsys.readouterr().err and EXAMPLES.is_dir()
