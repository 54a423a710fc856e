"""The transformers-native path (`model.generate(..., cache=DBTrimKVCache(...))`) and the model runner
(`dbtrimkv.generate`) give the same greedy tokens, text-only and with an image, with a full cache and
under a budget that evicts while decoding; and the runner's own checks (`prefill`'s vocabulary,
unsupported `generate` options, the per-row `done` predicate, stopping criteria).

Evictions happen at the same tokens in both paths when the prompt fits in one prefill chunk and
under the bound (`budget + L*H*buffer_size`): the native path feeds the whole prompt at once, the
runner all of it but its last token, then that token (as the server does); past the prompt both
evict lazily at the same decode steps. (A prompt longer than a chunk is where they differ on
purpose: the runner evicts between chunks, the native path cannot.)

Why: the runner replaced transformers' `generate` under every dbtrimkv path; users who drive the
model themselves (as kvpress users do) must keep getting what dbtrimkv's own calls give.
"""

from __future__ import annotations

import pytest
import torch
from helpers import image_chat, random_image, randomize_gates

import dbtrimkv
from dbtrimkv.errors import ConfigError
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.loading.tiny import build_tiny
from dbtrimkv.modeling.transformers_compat import cache_kwargs

STEPS = 12


@pytest.fixture(scope="module")
def models():
    out = {}
    for variant in ("qwen3", "qwen3_vl"):
        model, processor = build_tiny(variant)
        dbtrimkv.attach_retention_gates(model, intermediate_size=16)
        randomize_gates(model, seed=1)
        out[variant] = model.eval(), processor
    return out


def _prompt(variant, processor):
    if variant == "qwen3":
        return build_inputs(processor, "Name the seven colours of the rainbow, one by one, and why.")
    return build_inputs(processor, image_chat(random_image(7), "Describe the picture in detail."))


@pytest.mark.parametrize("variant", ["qwen3", "qwen3_vl"])
@pytest.mark.parametrize("evicts", [False, True])
def test_native_generate_gives_the_runners_greedy_tokens(models, variant, evicts):
    model, processor = models[variant]
    inputs = _prompt(variant, processor)
    prompt = inputs["input_ids"].shape[1]
    memory_size = prompt if evicts else None  # the prompt fits under the bound; decoding passes it
    config = dbtrimkv.DBTrimKVConfig(memory_size=memory_size, buffer_size=2, prefill_chunk=1024)
    native_cache = dbtrimkv.DBTrimKVCache(model, config)
    with torch.no_grad():
        native = model.generate(**inputs, **cache_kwargs(native_cache), max_new_tokens=STEPS, min_new_tokens=STEPS,
                                do_sample=False)[:, prompt:]
    cache = dbtrimkv.DBTrimKVCache(model, config)
    ours = dbtrimkv.generate(model, inputs, cache, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    assert ours.shape == (1, STEPS)
    assert torch.equal(ours, native)
    assert cache.seen == native_cache.seen  # the same tokens were fed (the last one is pending in both)
    if evicts:
        assert cache.num_evictions > 0 and cache.num_evictions == native_cache.num_evictions
        assert cache.num_entries(0) == native_cache.num_entries(0)


def test_prefill_refuses_ids_outside_the_vocabulary(models):
    model, _ = models["qwen3"]
    vocab = model.get_input_embeddings().num_embeddings
    cache = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig())
    with pytest.raises(ConfigError, match="vocabulary"):
        dbtrimkv.prefill(model, {"input_ids": torch.tensor([[1, vocab]])}, cache)
    assert cache.pool is None  # refused before anything ran


def test_generate_names_an_option_it_does_not_take(models):
    model, processor = models["qwen3"]
    cache = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig())
    with pytest.raises(ConfigError, match="num_beams"):
        dbtrimkv.generate(model, build_inputs(processor, "Hi"), cache, max_new_tokens=2, num_beams=2)


def test_a_done_predicate_ends_its_row_alone(models):
    """A row whose predicate fires stops there; the other row of the batch decodes as it would alone."""
    model, processor = models["qwen3"]
    inputs = build_inputs(processor, ["Count from one to ten.", "Say hello to the world, twice."])
    config = dbtrimkv.DBTrimKVConfig()
    free = dbtrimkv.generate(model, inputs, dbtrimkv.DBTrimKVCache(model, config), max_new_tokens=8,
                             min_new_tokens=8, do_sample=False)
    first_row = free[0].tolist()
    cut = dbtrimkv.generate(model, inputs, dbtrimkv.DBTrimKVCache(model, config), max_new_tokens=8,
                            min_new_tokens=8, do_sample=False, pad_token_id=0,
                            done=lambda ids: ids[:3] == first_row[:3])
    assert cut[0].tolist() == first_row[:3] + [0] * 5
    assert cut[1].tolist() == free[1].tolist()


def test_stopping_criteria_end_rows_like_transformers(models):
    """A transformers stopping criterion (`(ids, scores) -> [B] bools`) ends the rows it marks."""
    model, processor = models["qwen3"]
    inputs = build_inputs(processor, "Count from one to ten.")
    seen = []

    def after_four(ids, scores):
        seen.append(ids.shape[1])
        return torch.full((ids.shape[0],), ids.shape[1] >= inputs["input_ids"].shape[1] + 4)

    out = dbtrimkv.generate(model, inputs, dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig()),
                            max_new_tokens=10, min_new_tokens=10, do_sample=False, stopping_criteria=[after_four])
    assert out.shape == (1, 4)
    assert seen == [inputs["input_ids"].shape[1] + k for k in range(1, 5)]


def test_sampling_is_the_runners_seeded_and_validated(models):
    """`do_sample` draws through the runner's `Sampler`: the same under `torch.manual_seed` or an explicit
    seed, not the greedy answer, and a bad setting is one `ConfigError` naming it."""
    model, processor = models["qwen3"]
    inputs = build_inputs(processor, "Tell me a story.")

    def run(**options):
        cache = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig())
        options = {"min_new_tokens": 8, **options}
        return dbtrimkv.generate(model, inputs, cache, max_new_tokens=8, **options)[0].tolist()

    torch.manual_seed(3)
    first = run(do_sample=True, temperature=5.0)  # the command line's range, past OpenAI's 2
    torch.manual_seed(3)
    assert run(do_sample=True, temperature=5.0) == first
    assert run(do_sample=True, seed=11) == run(do_sample=True, seed=11)
    greedy = run(do_sample=False)
    assert any(run(do_sample=True, temperature=2.0, seed=s) != greedy for s in range(3))
    with pytest.raises(ConfigError, match="temperature"):
        run(do_sample=True, temperature=float("nan"))
    with pytest.raises(ConfigError, match="min_new_tokens"):
        run(min_new_tokens=-1)
