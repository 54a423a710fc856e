"""`dbtrimkv.generate` refuses bad inputs and options with one ConfigError naming the argument at fault,
before the cache is touched (found by a bad-input sweep: each case was a traceback from inside torch /
transformers, or a silently wrong answer), and takes numpy / torch integer scalars as ints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import gated_tiny_text, image_chat, random_image, video_chat

import dbtrimkv
from dbtrimkv.errors import ConfigError
from dbtrimkv.generation import decode_rows_for, generate
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.loading.tiny import build_tiny
from dbtrimkv.runner.sampling import InvalidSampling, LocalSampling, SamplingParams


@pytest.fixture(scope="module")
def gated_vl():
    model, processor = build_tiny("qwen3_vl")
    dbtrimkv.attach_retention_gates(model, intermediate_size=16)
    return model, processor


@pytest.fixture(scope="module")
def image_inputs(gated_vl):
    return dict(build_inputs(gated_vl[1], image_chat(random_image(0), "What?")))


@pytest.fixture(scope="module")
def text_model():
    model, tokenizer = gated_tiny_text()
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"]])
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def new_cache(model):
    return dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig())


def refused(model, inputs, *names, cache=None, **kwargs):
    """generate refuses with a ConfigError whose message names every one of `names`; the cache is untouched."""
    cache = cache if cache is not None else new_cache(model)
    seen = list(cache.seen)
    with pytest.raises(ConfigError) as error:
        generate(model, inputs, cache, **{"max_new_tokens": 2, **kwargs})
    for name in names:
        assert name in str(error.value), str(error.value)
    assert list(cache.seen) == seen
    return error.value


def without(inputs, *keys):
    return {k: v for k, v in inputs.items() if k not in keys}


# 1. placeholders, pixels and grids

def test_image_placeholders_without_pixels(gated_vl, image_inputs):
    model, _ = gated_vl
    refused(model, without(image_inputs, "pixel_values", "image_grid_thw"), "pixel_values", "image_grid_thw")
    refused(model, without(image_inputs, "pixel_values", "image_grid_thw", "mm_token_type_ids"), "pixel_values")
    refused(model, without(image_inputs, "pixel_values"), "pixel_values")
    refused(model, without(image_inputs, "image_grid_thw"), "image_grid_thw")


def test_video_placeholders_without_pixels(gated_vl):
    model, processor = gated_vl
    inputs = dict(build_inputs(processor, video_chat([random_image(i) for i in range(4)], "What?")))
    refused(model, without(inputs, "pixel_values_videos", "video_grid_thw"), "pixel_values_videos")
    refused(model, dict(inputs, pixel_values_videos=inputs["pixel_values_videos"][:5]), "pixel_values_videos")


def test_too_few_patches_for_the_grid(gated_vl, image_inputs):
    refused(gated_vl[0], dict(image_inputs, pixel_values=image_inputs["pixel_values"][:3]), "pixel_values",
            "image_grid_thw")


def test_grid_that_does_not_match(gated_vl, image_inputs):
    model, _ = gated_vl
    refused(model, dict(image_inputs, image_grid_thw=image_inputs["image_grid_thw"] * 2), "image_grid_thw")
    # patches agree with a doubled grid, but the placeholders do not
    pixels = image_inputs["pixel_values"]
    grid = image_inputs["image_grid_thw"] * torch.tensor([[1, 2, 1]])
    refused(model, dict(image_inputs, pixel_values=torch.cat([pixels, pixels]), image_grid_thw=grid),
            "image_grid_thw", "input_ids")
    refused(model, dict(image_inputs, image_grid_thw=image_inputs["image_grid_thw"][:, :2]), "image_grid_thw")


def test_placeholder_count_that_does_not_match(gated_vl, image_inputs):
    model, _ = gated_vl
    ids = image_inputs["input_ids"]
    drop = int(torch.nonzero(ids[0] == model.config.image_token_id)[0])
    keep = [c for c in range(ids.shape[1]) if c != drop]
    short = {k: (v[:, keep] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
             for k, v in image_inputs.items()}
    refused(model, short, "input_ids", "image_grid_thw")


def test_pixels_without_token_types(gated_vl, image_inputs):
    """Without mm_token_type_ids the image was silently read as text."""
    refused(gated_vl[0], without(image_inputs, "mm_token_type_ids"), "mm_token_type_ids")


def test_pixels_for_a_text_model(text_model, image_inputs):
    model, inputs = text_model
    refused(model, dict(inputs, pixel_values=image_inputs["pixel_values"], image_grid_thw=image_inputs["image_grid_thw"]),
            "pixel_values")


# 2. attention_mask

@pytest.mark.parametrize("make", [lambda t: torch.ones(1, 3, dtype=torch.long),
                                  lambda t: torch.ones(2, t, dtype=torch.long),
                                  lambda t: torch.zeros(1, t, dtype=torch.long),
                                  lambda t: torch.full((1, t), 2)],
                         ids=["short", "two-rows", "all-padding", "not-0-or-1"])
def test_bad_attention_mask(gated_vl, image_inputs, make):
    refused(gated_vl[0], dict(image_inputs, attention_mask=make(image_inputs["input_ids"].shape[1])), "attention_mask")


def test_bad_attention_mask_in_a_batch(text_model):
    model, inputs = text_model
    ids = inputs["input_ids"].repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1] = 0
    refused(model, {"input_ids": ids, "attention_mask": mask}, "attention_mask")


def test_bad_token_types(gated_vl, image_inputs):
    model, _ = gated_vl
    refused(model, dict(image_inputs, mm_token_type_ids=image_inputs["mm_token_type_ids"][:, 1:]), "mm_token_type_ids")
    refused(model, dict(image_inputs, mm_token_type_ids=image_inputs["mm_token_type_ids"] * 3), "mm_token_type_ids")


# 3. options

@pytest.mark.parametrize("name,value", [("streamer", 5), ("done", 5), ("done", [None, None]), ("eos_token_id", "x"),
                                        ("eos_token_id", [1, "x"]), ("eos_token_id", 10**6), ("eos_token_id", -1),
                                        ("pad_token_id", "x"), ("pad_token_id", [1]), ("pad_token_id", 10**6),
                                        ("logits_processor", 5), ("stopping_criteria", 5), ("stopping_criteria", [5]),
                                        ("min_new_tokens", -1), ("min_new_tokens", 1.5), ("do_sample", "yes"),
                                        ("seed", "x"), ("progress", 5), ("timings", 5)])
def test_bad_option(text_model, name, value):
    model, inputs = text_model
    refused(model, inputs, name, **{name: value})


@pytest.mark.parametrize("name,value", [("temperature", "x"), ("top_p", 0.0), ("top_k", -1), ("top_k", 1.5)])
def test_bad_sampling_option(text_model, name, value):
    model, inputs = text_model
    error = refused(model, inputs, name, do_sample=True, **{name: value})
    assert isinstance(error, InvalidSampling) and error.field == name


def test_refused_options_leave_the_cache_as_it_was(text_model):
    """A continued conversation keeps its pending token when the next call is refused."""
    model, inputs = text_model
    cache = new_cache(model)
    generate(model, inputs, cache, max_new_tokens=2)
    pending, entries = cache.requests[0].pending, cache.num_entries(0)
    refused(model, inputs, "streamer", cache=cache, streamer=5)
    refused(model, inputs, "temperature", cache=cache, do_sample=True, temperature=float("nan"))
    refused(model, dict(inputs, attention_mask=inputs["attention_mask"][:, 1:]), "attention_mask", cache=cache)
    assert cache.requests[0].pending == pending and pending
    assert cache.num_entries(0) == entries


def test_good_options_still_work(text_model):
    model, inputs = text_model
    seen = []

    class Streamer:
        def put(self, value):
            seen.append(value)

        def end(self):
            seen.append("end")

    out = generate(model, inputs, new_cache(model), max_new_tokens=3, streamer=Streamer(), done=[lambda ids: False],
                   eos_token_id=[np.int64(1), 2], pad_token_id=np.int64(0), progress=lambda done, total: None,
                   timings={})
    assert out.shape == (1, 3) and seen[-1] == "end"


# 4. numpy / torch integers

@pytest.mark.parametrize("tokens", [np.int64(3), np.int32(3), torch.tensor(3)])
def test_numpy_and_torch_integers(text_model, tokens):
    model, inputs = text_model
    expected = generate(model, inputs, new_cache(model), max_new_tokens=3)
    assert torch.equal(generate(model, inputs, new_cache(model), max_new_tokens=tokens, prefill_chunk=np.int64(4),
                                min_new_tokens=np.int64(1)), expected)
    sampled = [generate(model, inputs, new_cache(model), max_new_tokens=tokens, do_sample=True, top_k=np.int64(5),
                        seed=np.int64(7), temperature=np.float32(0.7)) for _ in range(2)]
    assert torch.equal(sampled[0], sampled[1])


@pytest.mark.parametrize("value", [True, 2.0, np.float64(3.0), torch.tensor(3.0), torch.tensor([3]), "3"])
def test_non_integer_max_new_tokens(text_model, value):
    model, inputs = text_model
    refused(model, inputs, "max_new_tokens", max_new_tokens=value)


def test_relabelled_setting_names_the_callers_argument(text_model):
    with pytest.raises(InvalidSampling) as error:
        decode_rows_for(text_model[0], 1, 0, {})
    assert error.value.field == "max_new_tokens" and "max_new_tokens" in str(error.value)
    assert "max_tokens" not in str(error.value).replace("max_new_tokens", "")


def test_sampling_params_take_numpy_and_torch_scalars():
    params = SamplingParams(max_tokens=np.int64(3), top_k=torch.tensor(2), seed=np.int32(1),
                            temperature=np.float32(0.5), top_p=torch.tensor(0.5))
    assert (params.max_tokens, params.top_k, params.seed) == (3, 2, 1)
    assert all(type(v) is int for v in (params.max_tokens, params.top_k, params.seed))
    assert type(params.temperature) is float and type(params.top_p) is float
    assert LocalSampling(max_tokens=np.uint8(4), temperature=np.int64(50)).temperature == 50
    for field, value in [("max_tokens", np.bool_(True)), ("top_k", True), ("seed", torch.tensor([1])),
                         ("max_tokens", torch.tensor(2.0)), ("temperature", torch.tensor(True))]:
        with pytest.raises(InvalidSampling) as error:
            SamplingParams(**{"max_tokens": 1, field: value})
        assert error.value.field == field


def test_a_row_with_only_its_pending_token(text_model):
    """A continued row with no new real token still feeds its pending token: not refused."""
    model, inputs = text_model
    cache = new_cache(model)
    generate(model, inputs, cache, max_new_tokens=2)
    ids = inputs["input_ids"][:, :2]
    out = generate(model, {"input_ids": ids, "attention_mask": torch.zeros_like(ids)}, cache, max_new_tokens=2)
    assert out.shape == (1, 2)


def test_eos_ids_as_a_tensor(text_model):
    model, inputs = text_model
    out = generate(model, inputs, new_cache(model), max_new_tokens=2, eos_token_id=torch.tensor([1, 2]))
    assert out.shape[0] == 1


@pytest.mark.parametrize("upto", [0, 10**6, "x", 1.5])
def test_bad_prefill_upto(text_model, upto):
    model, inputs = text_model
    cache = new_cache(model)
    with pytest.raises(ConfigError, match="upto"):
        dbtrimkv.prefill(model, inputs, cache, upto=upto)
    assert list(cache.seen) == []


def test_prefill_checks_its_inputs(gated_vl, image_inputs):
    model, _ = gated_vl
    with pytest.raises(ConfigError, match="pixel_values"):
        dbtrimkv.prefill(model, dict(image_inputs, pixel_values=image_inputs["pixel_values"][:3]), new_cache(model))
    with pytest.raises(ConfigError, match="progress"):
        dbtrimkv.prefill(model, image_inputs, new_cache(model), progress=5)


def test_a_prompt_that_ends_on_an_image_token_is_refused(gated_vl, image_inputs):
    model = gated_vl[0]
    types = image_inputs["mm_token_type_ids"]
    last = int(torch.nonzero(types[0] == 1).flatten()[-1]) + 1  # cut the prompt just after its last image token
    cut = {k: (v[:, :last] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
           for k, v in image_inputs.items()}
    refused(model, cut, "must end with a text token")


def test_a_batch_whose_rows_split_the_grid_otherwise_is_refused(gated_vl):
    model, processor = gated_vl
    chats = [image_chat(random_image(1, 32, 32), "What?"), image_chat(random_image(2, 64, 96), "What?")]
    inputs = dict(build_inputs(processor, chats))
    grid = inputs["image_grid_thw"]
    assert not torch.equal(grid[0], grid[1])  # two sizes: swapping them keeps every total, not the rows
    swapped = dict(inputs, image_grid_thw=grid.flip(0))
    refused(model, swapped, "row 0", "image_grid_thw")
    assert generate(model, inputs, new_cache(model), max_new_tokens=1).shape[0] == 2  # the real batch runs
