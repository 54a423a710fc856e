"""Retention calibration (`dbtrimkv/cache/calibration.py`): video tokens' log beta scaled, text and image
tokens' log beta capped at -decay_floor, before the cache stores (and every policy scores) it."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_gates

import dbtrimkv
from dbtrimkv.cache.calibration import calibrate
from dbtrimkv.cache.forward_plan import ForwardPlan
from dbtrimkv.errors import ConfigError
from dbtrimkv.inputs.modality import Modality
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.loading.tiny import build_tiny
from dbtrimkv.modeling.transformers_compat import cache_kwargs


def test_calibrate_scales_video_and_floors_the_rest():
    log_beta = torch.tensor([[[-2.0, -1e-20], [-0.5, -1e-20], [-4.0, -1e-3]]])  # [B=1, T=3, H=2]
    modality = torch.tensor([[Modality.TEXT, Modality.VIDEO, Modality.IMAGE]], dtype=torch.int8)
    out = calibrate(log_beta, modality, video_scale=0.1, floor=0.01)
    expected = torch.tensor([[[-2.0, -0.01], [-0.05, -1e-21], [-4.0, -0.01]]])  # video x 0.1, never floored
    assert torch.allclose(out, expected, rtol=1e-6, atol=0.0)
    assert torch.equal(calibrate(log_beta, None, floor=0.01), log_beta.clamp(max=-0.01))  # no modalities: all floored
    assert calibrate(log_beta, modality) is log_beta  # both off: untouched
    assert torch.equal(calibrate(log_beta, modality, video_scale=0.5)[0, 1], torch.tensor([-0.25, -5e-21]))
    assert torch.equal(calibrate(log_beta, None, video_scale=0.5), log_beta)  # no modalities: no video token


@pytest.mark.parametrize("kwargs, message", [
    (dict(video_decay_scale=0.0), "video_decay_scale"), (dict(video_decay_scale=1.5), "video_decay_scale"),
    (dict(video_decay_scale=float("nan")), "video_decay_scale"), (dict(decay_floor=-0.1), "decay_floor"),
    (dict(decay_floor=True), "decay_floor"), (dict(decay_floor="0.1"), "decay_floor"),
])
def test_bad_calibration_settings_are_one_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        dbtrimkv.DBTrimKVConfig(**kwargs)


def test_settings_round_trip_and_default_to_no_calibration(tmp_path):
    config = dbtrimkv.DBTrimKVConfig(memory_size=8, video_decay_scale=0.1, decay_floor=0.001)
    path = tmp_path / "c.yaml"
    config.save(path)
    again = dbtrimkv.DBTrimKVConfig.load(path)
    assert (again.video_decay_scale, again.decay_floor) == (0.1, 0.001)
    plain = dbtrimkv.DBTrimKVConfig()
    assert (plain.video_decay_scale, plain.decay_floor) == (1.0, 0.0)


@pytest.fixture(scope="module")
def gated_text_model():
    model, tokenizer = build_tiny("qwen3")
    dbtrimkv.attach_retention_gates(model, intermediate_size=8)
    randomize_gates(model, seed=3, scale=4.0, bias=0.0)
    return model, tokenizer


def _stored(model, tokenizer, config, modality):
    """`{(layer, head, position): log beta}` the cache stores after one forward whose token modalities are `modality`."""
    cache = dbtrimkv.DBTrimKVCache(model, config)
    ids = build_inputs(tokenizer, ["abcdefghij"])["input_ids"]
    cache.set_next_modality(modality(ids.shape))
    with torch.no_grad():  # embeddings in: the model pre-hook notes no input ids, the modalities set here stay
        model(inputs_embeds=model.get_input_embeddings()(ids), **cache_kwargs(cache))
    out = {}
    for s in cache._segment_ids(0):
        layer, head = divmod(s % cache.segments_per_sequence, cache.num_kv_heads)
        for slot in cache.tables.entries(s).tolist():
            out[(layer, head, int(cache.pool.pos[slot]))] = float(cache.pool.log_beta[slot])
    return out


def test_the_cache_stores_calibrated_log_beta_for_video_positions_only(gated_text_model):
    model, tokenizer = gated_text_model

    def every_other_video(shape):
        modality = torch.zeros(shape, dtype=torch.int8)
        modality[:, 1::2] = Modality.VIDEO
        return modality

    raw = _stored(model, tokenizer, dbtrimkv.DBTrimKVConfig(), every_other_video)
    calibrated = _stored(model, tokenizer, dbtrimkv.DBTrimKVConfig(video_decay_scale=0.25), every_other_video)
    floor = sorted(-v for v in raw.values())[len(raw) // 2]  # bites on about half the entries
    floored = _stored(model, tokenizer, dbtrimkv.DBTrimKVConfig(video_decay_scale=0.25, decay_floor=floor),
                      every_other_video)
    assert set(raw) == set(calibrated) == set(floored) and len(raw) > 20 and floor > 0
    assert len({round(v, 6) for v in raw.values()}) > 10  # varied gates: the check below means something
    for key, value in raw.items():
        video = key[2] % 2 == 1  # positions 1, 3, ... are video
        assert calibrated[key] == pytest.approx(value * 0.25 if video else value, rel=1e-6, abs=0.0)
        assert floored[key] == pytest.approx(value * 0.25 if video else min(value, -floor), rel=1e-6, abs=0.0)
    assert any(value > -floor for key, value in raw.items() if key[2] % 2 == 1)  # a video entry the floor spared
