"""The engine without HTTP: batching never changes answers, and it computes what `dbtrimkv.generate` does."""

from __future__ import annotations

import queue

import pytest
import torch

from dbtrimkv import DBTrimKVConfig, DBTrimKVPipeline, load_model
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.cache import DBTrimKVCache, SlotPool
from dbtrimkv.runner.positions import token_positions
from dbtrimkv.serving.api_errors import BadRequest
from dbtrimkv.runner.forward import RowInput, forward_rows
from dbtrimkv.serving.engine import Engine, EngineRequest
from dbtrimkv.runner.sampling import SamplingParams
from helpers import random_image, randomize_gates

CONFIG = DBTrimKVConfig(memory_size=4, buffer_size=4, prefill_chunk=8)  # evicts often, prefills in 8-token chunks


@pytest.fixture(scope="module")
def random_vl():
    model, processor = load_model("tiny")
    randomize_gates(model, seed=3)
    return model, processor


def chats(n: int) -> list[list[dict]]:
    """Prompts of different lengths, some with an image (a few chunks long)."""
    out = []
    for i in range(n):
        text = "tell me about it " * (1 + i % 4)
        content = [{"type": "text", "text": text}]
        if i % 2 == 0:
            content.insert(0, {"type": "image", "image": random_image(i, 32 + 16 * (i % 3), 48)})
        out.append([{"role": "user", "content": content}])
    return out


def submit_all(engine: Engine, processor, prompts, max_tokens: int = 10, config=CONFIG, **sampling) -> list:
    jobs = []
    for i, prompt in enumerate(prompts):
        events: queue.Queue = queue.Queue()
        job = EngineRequest(f"r{i}-{id(prompt)}", build_inputs(processor, prompt), config,
                            SamplingParams(max_tokens=max_tokens, temperature=sampling.get("temperature", 0),
                                           seed=sampling.get("seed"), ignore_eos=True), events.put)
        engine.submit(job)
        jobs.append((job, events))
    return jobs


def collect(jobs) -> list[list[int]]:
    out = []
    for job, events in jobs:
        while (event := events.get(timeout=60)).kind == "token":
            pass
        assert event.kind == "done", event.error
        out.append(job.generated)
    return out


def run(engine: Engine, processor, prompts, max_tokens: int = 10, config=CONFIG, **sampling) -> list[list[int]]:
    return collect(submit_all(engine, processor, prompts, max_tokens, config, **sampling))


@pytest.fixture(scope="module")
def engine(random_vl):
    model, processor = random_vl
    engine = Engine(model, processor, CONFIG, kv_memory=64 * 2**20, max_running=16)
    engine.start()
    yield engine
    engine.stop()


def test_sixteen_together_get_the_tokens_they_get_alone(engine, random_vl):
    prompts = chats(16)
    alone = [run(engine, random_vl[1], [p])[0] for p in prompts]
    together = run(engine, random_vl[1], prompts)
    assert together == alone
    assert len({tuple(t) for t in alone}) > 4  # different prompts, different answers


def test_images_of_rows_joining_together_are_encoded_in_one_call(engine, random_vl, monkeypatch):
    """The vision tower runs once for the images the rows' chunks reach in a step, not once per
    request, and each request still gets the tokens it gets alone."""
    model, processor = random_vl
    prompts = [p for p in chats(12) if p[0]["content"][0]["type"] == "image"]
    alone = [run(engine, processor, [p])[0] for p in prompts]
    visual, calls = model.model.visual, []
    real = visual.forward

    def counted(pixels, grid_thw, **kwargs):
        calls.append(len(grid_thw))
        return real(pixels, grid_thw=grid_thw, **kwargs)

    monkeypatch.setattr(visual, "forward", counted)
    with engine.cond:  # the engine waits until all are in: they join in one step
        jobs = submit_all(engine, processor, prompts)
    assert collect(jobs) == alone
    assert calls == [len(prompts)]  # six images, one call


def test_encoding_streams_together_gives_each_the_features_it_gets_alone(random_vl):
    from dbtrimkv.runner.positions import with_input_defaults
    from dbtrimkv.runner.prefill import PromptBatch
    from dbtrimkv.runner.vision import VisionStream

    model, processor = random_vl

    def stream(i):
        chat = [{"role": "user", "content": [{"type": "image", "image": random_image(40 + i, 32 + 16 * i, 48 + 8 * i)},
                                             {"type": "text", "text": "and this?"}]}]
        inputs = with_input_defaults(build_inputs(processor, chat), "cpu")
        return PromptBatch(model, inputs, [0], [0]).stream

    with torch.no_grad():
        streams = [stream(i) for i in range(3)]
        VisionStream.encode([(s, s.reached([(0, s.mask.shape[1])])) for s in streams])
        together = [s._encoded[0] for s in streams]
        for i, s in enumerate(streams):
            fresh = stream(i)
            VisionStream.encode([(fresh, fresh.reached([(0, fresh.mask.shape[1])]))])
            embeds, deep = fresh._encoded[0]
            assert embeds.shape == together[i][0].shape and embeds.shape[0] > 0
            torch.testing.assert_close(together[i][0], embeds, rtol=1e-5, atol=1e-5)
            for a, b in zip(together[i][1], deep):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_seeded_sampling_does_not_depend_on_the_batch(engine, random_vl):
    prompts = chats(6)
    alone = [run(engine, random_vl[1], [p], temperature=1.0, seed=7)[0] for p in prompts]
    assert run(engine, random_vl[1], prompts, temperature=1.0, seed=7) == alone


def test_engine_matches_generate(engine, random_vl):
    """Chunked prefill of all but the last prompt token, then decoding: what `dbtrimkv.generate` does."""
    model, processor = random_vl
    pipe = DBTrimKVPipeline(model, processor, CONFIG)
    for prompt in chats(4):
        out = pipe(prompt, max_new_tokens=10, progress=False)
        served = run(engine, processor, [prompt], max_tokens=10)[0]
        assert served[: len(out.token_ids)] == out.token_ids


def test_pool_slots_all_return(engine, random_vl):
    run(engine, random_vl[1], chats(5))
    assert engine.pool.num_free == engine.pool.capacity == engine.admission.pool_slots > 0
    assert engine.admission.reserved == 0


def text_row(model, processor, text: str, seen: int = 0) -> RowInput:
    inputs = build_inputs(processor, [{"role": "user", "content": text}])
    ids = inputs["input_ids"]
    positions = token_positions(model, dict(inputs, mm_token_type_ids=torch.zeros_like(ids)), torch.ones_like(ids),
                                [seen], [seen])[..., 0, :]
    return RowInput(ids[0], positions, torch.zeros_like(ids[0]))


def test_a_parked_sequence_continues_in_another_cache_on_the_same_pool(random_vl):
    """`park_sequence` keeps a row's slots; `add_sequence(parked)` on another cache sharing the pool
    continues it exactly as if it had never left (what a session's next turn does)."""
    model, processor = random_vl
    pool = SlotPool(model.config.text_config.head_dim, torch.float32, torch.device("cpu"))
    pool.ensure_free(5000, limit=5000)
    a, b, alone = DBTrimKVCache(model, CONFIG), DBTrimKVCache(model, CONFIG), DBTrimKVCache(model, CONFIG)
    a.use_pool(pool)
    b.use_pool(pool)
    first, other = text_row(model, processor, "tell me a story " * 3), text_row(model, processor, "hi")
    a.add_sequence()
    a.add_sequence()
    with torch.inference_mode():
        forward_rows(model, a, [first, other])
        forward_rows(model, alone, [first])
        parked = a.park_sequence(0)
        assert a.batch_size == 1 and pool.num_free == 5000 - parked.num_slots - a.num_entries(0)
        assert b.add_sequence(parked) == 0
        follow = text_row(model, processor, "and then?", seen=alone.seen[0])
        assert torch.allclose(forward_rows(model, b, [follow]), forward_rows(model, alone, [follow]), atol=1e-5)
    assert b.retained_slots(0).numel() == alone.num_entries(0) == b.num_entries(0)
    assert [t.tolist() for layer in b.retained_positions(0) for t in layer] == \
        [t.tolist() for layer in alone.retained_positions(0) for t in layer]
    b.remove_sequence(0)
    a.remove_sequence(0)
    assert pool.num_free == pool.capacity == 5000


def test_a_long_prefill_does_not_stall_decoding(engine, random_vl):
    """A prompt of ~50 chunks advances one chunk per step while a short request decodes beside it."""
    model, processor = random_vl
    events = {}
    jobs = {}
    for name, text, tokens in (("long", "a long document " * 25, 2), ("short", "hi", 6)):
        events[name] = queue.Queue()
        jobs[name] = EngineRequest(name, build_inputs(processor, [{"role": "user", "content": text}]), CONFIG,
                                   SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True), events[name].put)
    assert jobs["long"].prompt_len > 40 * CONFIG.prefill_chunk
    engine.submit(jobs["long"])
    engine.submit(jobs["short"])
    for name in ("long", "short"):
        while events[name].get(timeout=60).kind == "token":
            pass
    assert jobs["short"].last_token_at < jobs["long"].first_token_at


def test_pool_and_views_stay_within_kv_memory_under_sixteen_requests(engine, random_vl):
    """16 requests in a memory for about 5 (each reserves 72 slots of 141 bytes and 12720 bytes of
    views): at every engine step pool bytes + view bytes <= kv_memory, the rest wait, answers do not change."""
    model, processor = random_vl
    prompts = chats(16)
    alone = [run(engine, processor, [p])[0] for p in prompts]
    tight = Engine(model, processor, CONFIG, kv_memory=120_000, max_running=16)
    admission = tight.admission
    assert admission.pool_slots * 141 + admission.view_bytes == 120_000
    tight.start()
    try:
        assert run(tight, processor, prompts) == alone
    finally:
        tight.stop()
    steps = list(tight.steps)
    assert all(r.pool_bytes + r.views_bytes <= 120_000 for r in steps)
    assert max(r.views_bytes for r in steps) > 0  # the views did serve
    fit = min(admission.pool_slots // 72, admission.view_bytes // 12720)
    assert 2 <= fit < 16 and max(r.running for r in steps) == fit  # as many ran at once as fit, the rest waited
    assert tight.metrics.get("kv_views_bytes_peak") == max(r.views_bytes for r in steps)


def test_prompt_chunks_and_single_tokens_run_in_separate_forwards(engine, random_vl, monkeypatch):
    """Rows are left-padded to the widest in a forward, so a step whose rows mix prompt chunks and single
    tokens (decoding, or a prompt's last token) runs them as two forwards (`Stepper.phases`): no forward
    pads a one-token row to a chunk's width, each row feeds once a step, and answers do not change."""
    from dbtrimkv.serving import stepper as stepper_module

    model, processor = random_vl
    prompts = [[{"role": "user", "content": "hi"}]] + [[{"role": "user", "content": "rivers and lakes " * (4 + i)}]
                                                      for i in range(3)]
    alone = [run(engine, processor, [p], max_tokens=16)[0] for p in prompts]
    real, forwards = stepper_module.forward_rows, []

    def recording(model_, cache, rows):
        forwards.append(sorted(r.ids.numel() for r in rows))
        return real(model_, cache, rows)

    monkeypatch.setattr(stepper_module, "forward_rows", recording)
    steps_before = len(engine.steps)
    assert run(engine, processor, prompts, max_tokens=16) == alone
    assert all(widths[-1] == 1 or widths[0] > 1 for widths in forwards)  # never a one-token row beside a chunk
    assert any(widths[0] > 1 for widths in forwards) and any(widths[-1] == 1 for widths in forwards)
    assert len(engine.steps) - steps_before < len(forwards)  # some step ran a chunk forward and a token forward
    fed = sum(build_inputs(processor, p)["input_ids"].shape[1] + 16 - 1 for p in prompts)
    assert sum(sum(widths) for widths in forwards) == fed  # every prompt token and every fed token once


def test_prefill_budget_caps_every_step_and_answers_do_not_change(engine, random_vl):
    """Six long prompts admitted together with a budget of two chunks per step: no step prefills more,
    a request that decodes meanwhile is never held up, and every answer is the one it gets alone."""
    model, processor = random_vl
    texts = ["a long document about rivers " * (6 + 2 * i) for i in range(6)]
    prompts = [[{"role": "user", "content": "hi"}]] + [[{"role": "user", "content": t}] for t in texts]
    alone = [run(engine, processor, [p], max_tokens=24 if i == 0 else 4)[0] for i, p in enumerate(prompts)]
    cap = 2 * CONFIG.prefill_chunk
    capped = Engine(model, processor, CONFIG, kv_memory=64 * 2**20, max_prefill_tokens=cap)
    capped.start()
    jobs = []
    try:
        for i, prompt in enumerate(prompts):
            events: queue.Queue = queue.Queue()
            job = EngineRequest(f"p{i}", build_inputs(processor, prompt), CONFIG,
                                SamplingParams(max_tokens=24 if i == 0 else 4, temperature=0, ignore_eos=True),
                                events.put)
            capped.submit(job)
            jobs.append((job, events))
        for job, events in jobs:
            while (event := events.get(timeout=60)).kind == "token":
                pass
            assert event.kind == "done", event.error
    finally:
        capped.stop()
    assert [job.generated for job, _ in jobs] == alone
    long_prompts = sum(job.prompt_len for job, _ in jobs[1:])
    assert long_prompts > 20 * cap
    steps = list(capped.steps)
    assert max(r.prefill_tokens for r in steps) == cap  # several rows' chunks in one step, never more than the cap
    assert sum(r.prefill_tokens for r in steps) == sum(job.prompt_len for job, _ in jobs)
    short = jobs[0][0]
    assert short.last_token_at < max(job.first_token_at for job, _ in jobs[1:])  # it decoded while they prefilled
    assert capped.metrics.get("step_prefill_tokens_peak") == cap
    wide = EngineRequest("wide", build_inputs(processor, prompts[1]), CONFIG.replace(prefill_chunk=cap + 1),
                         SamplingParams(max_tokens=1), lambda event: None)
    with pytest.raises(BadRequest, match="prefill budget per step"):  # it could never get its chunk
        capped.submit(wide)
