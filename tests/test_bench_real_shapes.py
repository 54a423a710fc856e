"""bench/bench_real_shapes.py's arithmetic without a model: the depth flag, the 36-layer fit
statement from measured rows (KV per token scaled from the depth that ran, weights + runtime, the
full cache's prefill activations), and the tables of a partial report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_real_shapes as bench  # noqa: E402

GIB = 1 << 30
PER_TOKEN_PER_LAYER = 2 * 8 * 128 * 2  # K and V, 8 KV heads, head_dim 128, bf16


def test_depth_flag():
    assert bench.depth("all") is None
    assert bench.depth("36") == 36
    for bad in ("0", "-2", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.depth(bad)


def report_with(layers: int) -> dict:
    prompt = {"prompt_tokens": 1000, "video": 600}
    hf = {"cache": "hf full", "decode_tokens": 6, "kv_bytes": 1005 * PER_TOKEN_PER_LAYER * layers,
          "rss_before_gib": 3.0, "peak_rss_gib": 4.0, "prefill_cpu_s": 10.0, "prefill_wall_s": 20.0,
          "decode_cpu_ms_per_token": 100.0, "decode_wall_ms_per_token": 200.0}
    ours = dict(hf, cache="ours M=128", kv_bytes=hf["kv_bytes"] // 4, bound_bytes=1000 * layers,
                prefill_cpu_s=5.0, decode_cpu_ms_per_token=50.0, peak_rss_gib=3.5)
    scenario = {"prompt": prompt, "layers": layers, "vision_depth": 24, "weights_run_gib": 1.5,
                "rss_after_build_gib": 2.5, "runs": [hf, ours]}
    return {"memory": {"weights_36_layers_gib": 8.0}, "threads": 1,
            "scenarios": {"video 10 min @1fps (160x96)": scenario}}


@pytest.mark.parametrize("layers", [2, 36])
def test_fit_statement_scales_measured_bytes_to_36_layers(layers):
    report = report_with(layers)
    args = argparse.Namespace(ram_gib=24.0, video_minutes=10.0)
    bench.finish_tables(report, report["scenarios"], args, 36)
    fit = report["fit"]
    per_token = 36 * PER_TOKEN_PER_LAYER
    assert fit["kv_bytes_per_token_36_layers_measured"] == per_token == 147456
    assert fit["non_kv_gib_36_layers"] == 9.0  # 8 GiB of weights + (2.5 - 1.5) GiB of runtime
    assert fit["full_cache_max_tokens_36_layers"] == 15 * GIB // per_token
    activations = (GIB - 1005 * PER_TOKEN_PER_LAYER * layers) / 1000
    assert fit["prefill_activation_bytes_per_token"] == round(activations)
    assert fit["full_cache_max_tokens_36_layers_one_shot_prefill"] == int(15 * GIB // (per_token + activations))
    assert fit["video_tokens_per_frame"] == 1.0
    assert fit["full_cache_max_video_minutes_at_1fps"] == round(fit["full_cache_max_tokens_36_layers"] / 60, 1)
    assert fit["ours"]["ours M=128"]["kv_bound_gib_36_layers"] == round(36000 / GIB, 3)
    ours = report["scenarios"]["video 10 min @1fps (160x96)"]["runs"][1]
    assert ours["vs_hf"] == {"prefill_cpu_s": 0.5, "decode_cpu_ms_per_token": 0.5, "kv_bytes": 0.25,
                             "peak_rss_gib": 0.875}


def test_tables_of_a_partial_report():
    report = report_with(36)
    scenario = report["scenarios"]["video 10 min @1fps (160x96)"]
    scenario["runs"] = scenario["runs"][:1]  # cut short after the full-cache row
    bench.finish_tables(report, report["scenarios"], argparse.Namespace(ram_gib=24.0, video_minutes=10.0), 36)
    table = bench.markdown(report)
    rows = [line for line in table.splitlines() if line.startswith("| video")]
    assert rows == ["| video 10 min @1fps (160x96) | 1000 | 36/24 | hf full | 10.0 (20.0) | 100.0 (200.0) | "
                    "141.3 | 4.0 |  |  |  |  |"]
    assert "Ours keeps" not in table and "at most 109226 tokens" in table
