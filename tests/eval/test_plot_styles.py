"""Benchmark plots keep lines with equal values distinguishable (they used to hide behind each other)."""

from __future__ import annotations

import itertools

import pytest

from dbtrimkv.eval import long_video_report, report
from dbtrimkv.eval.harness import FULL
from dbtrimkv.eval.long_video import FULL as LONG_FULL
from dbtrimkv.eval.plot_styles import distinct_styles


def _look(line) -> tuple:
    return (line.get_marker(), str(line.get_linestyle()), line.get_fillstyle(), line.get_markersize())


def _assert_equal_lines_differ(lines):
    for a, b in itertools.combinations(lines, 2):
        if list(a.get_xdata()) == list(b.get_xdata()) and list(a.get_ydata()) == list(b.get_ydata()):
            assert _look(a) != _look(b), (a.get_label(), b.get_label(), _look(a))
            top = max((a, b), key=lambda line: line.get_zorder())
            # the line on top is hollow and larger, so the marker below shows inside it
            assert top.get_fillstyle() == "none" and top.get_markersize() > min(a.get_markersize(), b.get_markersize())


def test_synthetic_plot_equal_policies_and_full_cache(tmp_path):
    budgets = [0.05, 0.1, 0.5]
    accuracy = {"global": [1.0, 1.0, 1.0], "head": [1.0, 1.0, 1.0], "streaming": [0.2, 0.5, 1.0]}
    results = {"spec": {"kind": "image", "examples": 10},
               "results": [{"policy": FULL, "budget": None, "accuracy": 1.0, "by_modality": {}}]
               + [{"policy": p, "budget": b, "accuracy": a, "by_modality": {}}
                  for p, values in accuracy.items() for b, a in zip(budgets, values)]}
    fig = report.figure(results)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["global"].get_ydata()) == list(lines["head"].get_ydata()) == [100.0] * 3
    _assert_equal_lines_differ([lines["global"], lines["head"]])
    # global and head both lie on the full cache's line: both are drawn as overlapping it, head over both
    assert lines["global"].get_fillstyle() == "none" and lines["head"].get_markersize() > lines["global"].get_markersize()
    assert lines["streaming"].get_fillstyle() == "none"  # it meets the others at 0.5, so it is drawn over them
    report.plot(results, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_long_video_plot_equal_policies_and_full_cache(tmp_path):
    cells = [{"minutes": m, "policy": p, "status": "ok", "accuracy": 1.0, "kv_bytes": 2**20 * (8 if p == LONG_FULL else 1)}
             for m in (1, 2, 5) for p in (LONG_FULL, "global", "head")]
    results = {"spec": {"full_cache_cap_mb": 64, "memory_size": 32}, "results": cells}
    fig = long_video_report.figure(results)
    accuracy_lines = [line for line in fig.axes[0].get_lines() if line.get_label() in ("full cache", "global", "head")]
    memory_lines = [line for line in fig.axes[1].get_lines() if line.get_label() in ("full cache", "global", "head")]
    assert len(accuracy_lines) == 3 and len(memory_lines) == 3
    _assert_equal_lines_differ(accuracy_lines)
    _assert_equal_lines_differ(memory_lines)
    full = next(line for line in memory_lines if line.get_label() == "full cache")
    assert full.get_color() == "black"


def test_distinct_styles_only_changes_lines_that_meet():
    styles = distinct_styles({"a": [1, 2, 3], "b": [4, 5, 6], "c": [1, None, 7], "d": [1, 2, 3]})
    assert styles["a"]["linestyle"] == styles["b"]["linestyle"] == "-" and styles["a"]["marker"] != styles["b"]["marker"]
    assert styles["c"]["fillstyle"] == "none" and styles["d"]["markersize"] > styles["c"]["markersize"]
    assert styles["c"]["linestyle"] != styles["d"]["linestyle"]
    assert len({s["marker"] for s in styles.values()}) == 4


@pytest.mark.parametrize("count", [2, 8])  # the synthetic benchmark draws 7 policies and the full cache
def test_many_equal_series_stay_distinct(count):
    styles = distinct_styles({f"s{i}": [1.0] for i in range(count)})
    looks = {(s["marker"], str(s["linestyle"]), s.get("fillstyle"), s["markersize"]) for s in styles.values()}
    assert len(looks) == count and max(s["markersize"] for s in styles.values()) <= 20
