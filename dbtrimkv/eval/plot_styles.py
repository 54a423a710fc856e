"""Line styles that keep equal curves visible in the benchmark plots.

Why: policies often score the same (every policy at 100% on a generous budget, `global` equal to the
full cache); drawn alike, a later line hides the earlier ones exactly and the reader sees one curve
where there are three. Every series gets its own marker; a series that meets an earlier one at some
point is drawn on top of it with a different line style and a larger, hollow marker, so the marker
below shows inside it and the line below shows through its gaps.
"""

from __future__ import annotations

import math

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
OVERLAP_LINESTYLES = ("--", ":", "-.", (0, (5, 1, 1, 1)))
MARKER_SIZE = 6.0


def _meets(a: list, b: list) -> bool:
    """Do two series (values at the same x positions; None where missing) share a point?"""
    return any(x is not None and y is not None and math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)
               for x, y in zip(a, b))


def distinct_styles(series: dict[str, list[float | None]]) -> dict[str, dict]:
    """Keyword arguments for `Axes.plot`, per series name, in drawing order (later on top).

    `series` maps each name to its values at common x positions (None where it has none)."""
    styles, drawn = {}, []
    for index, (name, values) in enumerate(series.items()):
        below = sum(_meets(values, other) for other in drawn)
        style = dict(marker=MARKERS[index % len(MARKERS)], zorder=2 + index, markersize=MARKER_SIZE)
        if below:
            style.update(linestyle=OVERLAP_LINESTYLES[(below - 1) % len(OVERLAP_LINESTYLES)],
                         markersize=MARKER_SIZE + 3 * min(below, 4), fillstyle="none", markeredgewidth=1.5)
        else:
            style.update(linestyle="-")
        styles[name] = style
        drawn.append(values)
    return styles
