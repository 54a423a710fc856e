"""Deferred gates (`dbtrimkv/cache/deferred_gates.py`): decode steps queue each layer's gate input, and
the queue's log beta is computed in one call per layer before anything reads it. The stored values
must be those of gates run at once (a prefill of the same tokens computes them eagerly), with the
calibration applied; the queue must be empty whenever an eviction, a park, a clone or a pool read
happens, and stay under its byte bound."""

from __future__ import annotations

import pytest
import torch
from helpers import gated_tiny_text, randomize_gates

import dbtrimkv
from dbtrimkv.cache import deferred_gates
from dbtrimkv.inputs.modality import Modality
from dbtrimkv.modeling.model_anatomy import text_attention_modules
from dbtrimkv.modeling.transformers_compat import cache_kwargs
from dbtrimkv.runner.forward import RowInput, forward_rows


@pytest.fixture(scope="module")
def model():
    model, _ = gated_tiny_text(intermediate_size=16)
    randomize_gates(model, seed=5, scale=2.0, bias=-1.0)
    return model


def _ids(seed: int, length: int) -> torch.Tensor:
    return torch.randint(5, 200, (1, length), generator=torch.Generator().manual_seed(seed))


def _by_position(cache, row: int = 0) -> dict[tuple[int, int, int], float]:
    """(layer, head, position) -> stored log beta of every entry of sequence `row` (reads `cache.pool`)."""
    pool, out = cache.pool, {}
    for s in cache.store.segment_ids(row):
        layer, head = divmod(s % cache.segments_per_sequence, cache.num_kv_heads)
        for slot in cache.tables.entries(s).tolist():
            out[(layer, head, int(pool.pos[slot]))] = float(pool.log_beta[slot])
    return out


def _decode(model, cache, ids, start: int) -> None:
    """Feed `ids[:, start:]` one token per forward (the deferred path)."""
    for j in range(start, ids.shape[1]):
        model(input_ids=ids[:, j : j + 1], use_cache=True, **cache_kwargs(cache))


@pytest.mark.parametrize("calibration", [{}, dict(video_decay_scale=0.25, decay_floor=1.0)])
def test_deferred_log_beta_equals_the_gates_run_at_once(model, calibration):
    ids = _ids(0, 24)
    eager = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig(**calibration))  # no budget: nothing evicted
    deferred = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig(**calibration))
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **cache_kwargs(eager))  # one 24-token forward: gates at once
        model(input_ids=ids[:, :8], use_cache=True, **cache_kwargs(deferred))
        _decode(model, deferred, ids, 8)
    assert len(deferred.store.gates) == 16 * len(text_attention_modules(model))  # queued, not computed
    want, got = _by_position(eager), _by_position(deferred)  # reading the pool completes the queue
    assert len(deferred.store.gates) == 0 and sorted(got) == sorted(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    if calibration:  # the calibration reached the deferred (text) entries: floored
        raw = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig())
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **cache_kwargs(raw))
        for key, value in _by_position(raw).items():
            assert got[key] == pytest.approx(min(value, -1.0), rel=1e-5, abs=1e-6), key
        assert any(v > -1.0 for (_, _, p), v in _by_position(raw).items() if p >= 8)  # (some were floored)


def test_queue_calibrates_each_token_by_its_modality():
    gates = deferred_gates.DeferredGates(dbtrimkv.DBTrimKVConfig(video_decay_scale=0.5, decay_floor=0.1))
    identity = lambda hidden: hidden  # noqa: E731 - the gate input is the log beta itself
    gates.add(0, identity, torch.tensor([[-0.01, -1.0]]), torch.tensor([[3, 1]]), torch.tensor([Modality.TEXT]))
    gates.add(0, identity, torch.tensor([[-0.01, -1.0]]), torch.tensor([[0, 2]]), torch.tensor([Modality.VIDEO]))
    gates.add(1, identity, torch.tensor([[-0.02, -0.3]]), torch.tensor([[5, 4]]),
              torch.tensor([Modality.IMAGE], dtype=torch.int8))
    assert len(gates) == 3 and gates.bytes == 3 * 2 * 4
    log_beta = torch.full((6,), 7.0)
    gates.write_into(log_beta)
    assert torch.allclose(log_beta, torch.tensor([-0.005, -1.0, -0.5, -0.1, -0.3, -0.1]))
    assert len(gates) == 0 and gates.bytes == 0


def test_one_gate_call_per_layer_for_a_queue(model):
    calls = []
    gates = [m.retention_gate for m in text_attention_modules(model)]
    handles = [g.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[:-1])) for g in gates]
    try:
        cache = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig())
        with torch.no_grad():
            ids = _ids(1, 20)
            model(input_ids=ids[:, :4], use_cache=True, **cache_kwargs(cache))
            calls.clear()
            _decode(model, cache, ids, 4)
            assert calls == []  # 16 decode steps ran no gate
            cache.pool  # noqa: B018 - a read completes the queue
    finally:
        for h in handles:
            h.remove()
    assert calls == [torch.Size([16])] * len(gates)  # one call per layer, 16 rows each


def test_queue_is_completed_before_eviction_park_and_clone(model):
    config = dbtrimkv.DBTrimKVConfig(memory_size=6, buffer_size=4)
    ids = _ids(2, 30)
    with torch.no_grad():
        evicting = dbtrimkv.DBTrimKVCache(model, config)
        model(input_ids=ids[:, :10], use_cache=True, **cache_kwargs(evicting))
        after_queue = []
        for j in range(10, 30):
            before = len(evicting.store.gates)
            evictions = evicting.num_evictions
            model(input_ids=ids[:, j : j + 1], use_cache=True, **cache_kwargs(evicting))
            if evicting.num_evictions > evictions and before:  # the queue was completed, then this step queued
                after_queue.append(len(evicting.store.gates))
        assert len(after_queue) >= 3 and set(after_queue) == {len(text_attention_modules(model))}
        # every kept entry's log beta is its gate's value (a fresh cache's prefill recomputes it at once);
        # layer 0's gate input does not depend on what was evicted, so there it must be the same value
        eager = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig())
        model(input_ids=ids, use_cache=True, **cache_kwargs(eager))
        want = _by_position(eager)
        kept = [k for k in _by_position(evicting) if k[0] == 0]
        assert len(kept) >= 6 and any(k[2] >= 10 for k in kept)
        assert all(_by_position(evicting)[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6) for k in kept)

        source = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig())
        model(input_ids=ids[:, :10], use_cache=True, **cache_kwargs(source))
        _decode(model, source, ids[:, :16], 10)
        copy = source.clone()
        assert len(source.store.gates) == 0 and len(copy.store.gates) == 0
        cloned = _by_position(copy)
        assert sorted(cloned) == sorted(k for k in want if k[2] < 16)
        assert all(cloned[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6) for k in cloned)
        _decode(model, source, ids[:, :20], 16)
        parked = source.park_sequence(0)
        assert len(source.store.gates) == 0
        other = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig())
        other.use_pool(source.pool)
        other.add_sequence(parked)
    got = _by_position(other)
    assert sorted(got) == sorted(k for k in want if k[2] < 20)
    assert all(got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6) for k in got)


def test_queue_stays_under_its_byte_bound(model, monkeypatch):
    layers = len(text_attention_modules(model))
    hidden = model.config.hidden_size
    step_bytes = layers * hidden * 4  # one decode step's queued rows (float32)
    monkeypatch.setattr(deferred_gates, "MAX_BYTES", 3 * step_bytes)
    cache = dbtrimkv.DBTrimKVCache(model, dbtrimkv.DBTrimKVConfig())
    most = 0
    with torch.no_grad():
        ids = _ids(3, 20)
        model(input_ids=ids[:, :2], use_cache=True, **cache_kwargs(cache))
        for j in range(2, 20):
            model(input_ids=ids[:, j : j + 1], use_cache=True, **cache_kwargs(cache))
            most = max(most, cache.store.gates.bytes)
    assert most == 3 * step_bytes  # reached the bound, then completed before the next forward queued more


def _row(ids: torch.Tensor, start: int, types: torch.Tensor | None = None) -> RowInput:
    n = ids.numel()
    return RowInput(ids, torch.arange(start, start + n), torch.zeros(n, dtype=torch.long) if types is None else types)


def test_ragged_decode_pairs_each_row_with_its_own_entries(model):
    """Rows of one batch that sit decode steps out (left padding in the batched forward), one decoded
    token tagged video, the calibration on: every entry's log beta is what the row gets alone, in one
    eager forward of all its tokens, with the same modalities."""
    config = dbtrimkv.DBTrimKVConfig(video_decay_scale=0.25, decay_floor=1.0)
    gen = torch.Generator().manual_seed(7)
    tokens = [torch.randint(5, 200, (n,), generator=gen) for n in (7, 4, 9)]
    types = [torch.zeros(n, dtype=torch.long) for n in (7, 4, 9)]
    cache = dbtrimkv.DBTrimKVCache(model, config)
    with torch.no_grad():
        forward_rows(model, cache, [_row(t, 0) for t in tokens])
        for step in range(10):
            rows = []
            for b in range(3):
                if (b == 1 and step % 3) or (b == 0 and step in (4, 5)):  # sits this step out
                    rows.append(_row(torch.zeros(0, dtype=torch.long), 0))
                    continue
                token = torch.randint(5, 200, (1,), generator=gen)
                kind = torch.full((1,), int(Modality.VIDEO) if (b, step) == (2, 3) else 0)
                rows.append(_row(token, tokens[b].numel(), kind))
                tokens[b], types[b] = torch.cat([tokens[b], token]), torch.cat([types[b], kind])
            forward_rows(model, cache, rows)
        assert len(cache.store.gates) > 0
        copy = cache.clone()  # (the copy keeps the calibration: it computes the next queue with it)
        forward_rows(model, copy, [_row(torch.tensor([9]), t.numel()) for t in tokens])
    video_at = 9 + 3  # row 2's prompt had 9 tokens; it decoded at every step
    assert int(types[2][video_at]) == Modality.VIDEO
    for b in range(3):
        alone = dbtrimkv.DBTrimKVCache(model, config)
        with torch.no_grad():
            forward_rows(model, alone, [_row(tokens[b], 0, types[b])])
        want, got = _by_position(alone), _by_position(cache, b)
        assert sorted(got) == sorted(want)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (b, key)
        copied = _by_position(copy, b)
        assert all(copied[key] == got[key] for key in got)  # the copy's older entries are the original's
    scaled = [v for (_, _, p), v in got.items() if p == video_at]
    assert len(scaled) == len(text_attention_modules(model)) * cache.num_kv_heads and max(scaled) > -1.0  # not floored
    newest = {k: v for k, v in _by_position(copy, 1).items() if k[2] == tokens[1].numel()}
    assert newest and max(newest.values()) <= -1.0  # the copy's own decode step: floored by the copied settings
