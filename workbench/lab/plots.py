"""Bokeh figures of the lab: the Pareto view of a sweep, and latency histograms.

Column builders are pure (`pareto_columns`, `histogram_columns`) so the
dashboard's Load view and a notebook draw the same data; the figure builders
take `ColumnDataSource`s and read nothing else. Bokeh is imported only here.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .pareto import metric, pareto_front

Columns = dict[str, list]
ITL_COLORS = ("#2ca02c", "#ff7f0e", "#d62728")  # within the first threshold, within the second, past both


def pareto_columns(configs: Sequence[dict[str, Any]], summaries: Sequence[dict[str, Any]],
                   current: dict[str, Any] | None = None, x: str = "itl_ms.p99",
                   y: str = "goodput_rps") -> tuple[Columns, Columns]:
    """(points, frontier) columns: every setting, and the frontier in order of x; `current` is highlighted."""
    xs = [metric(s, x) for s in summaries]
    ys = [metric(s, y) for s in summaries]
    front = pareto_front(xs, ys)
    on_front = set(front)
    pts: Columns = {k: [] for k in ("x", "y", "label", "pareto", "current", "color", "size", "line_color")}
    for i, (cfg, xv, yv) in enumerate(zip(configs, xs, ys)):
        if xv is None or yv is None:
            continue
        is_current = current is not None and all(cfg.get(k) == v for k, v in current.items() if k in cfg)
        pts["x"].append(xv)
        pts["y"].append(yv)
        pts["label"].append(" ".join(f"{k}={v}" for k, v in cfg.items() if k in ("max_batch", "token_budget",
                                                                                  "num_blocks")))
        pts["pareto"].append(i in on_front)
        pts["current"].append(is_current)
        pts["color"].append("#1f77b4" if i in on_front else "#9ecae1")
        pts["size"].append(16 if is_current else 10)
        pts["line_color"].append("#000000" if is_current else "#ffffff")
    frontier: Columns = {"x": [xs[i] for i in front], "y": [ys[i] for i in front]}
    return pts, frontier


def histogram_columns(values_ms: Sequence[float], bins: int = 30, upper: float | None = None) -> Columns:
    """Quads of a histogram of latencies in ms (empty columns when there are none)."""
    cols: Columns = {"left": [], "right": [], "top": [], "count": []}
    if not len(values_ms):
        return cols
    a = np.asarray(values_ms, dtype=float)
    hi = upper if upper is not None else float(np.percentile(a, 99.5)) * 1.05 or 1.0
    counts, edges = np.histogram(np.clip(a, 0, hi), bins=bins, range=(0.0, max(hi, 1e-3)))
    cols["left"], cols["right"] = edges[:-1].tolist(), edges[1:].tolist()
    cols["top"] = counts.tolist()
    cols["count"] = counts.tolist()
    return cols


def pareto_figure(points: Any, frontier: Any, *, x_label: str = "p99 inter-token latency (ms)",
                  y_label: str = "goodput (req/s within the SLOs)", slo_x: float | None = None, height: int = 320):
    """Settings as dots (dark = on the frontier, ringed = the current one), the frontier as a step line."""
    from bokeh.models import ColumnDataSource, HoverTool, Span
    from bokeh.plotting import figure

    if not isinstance(points, ColumnDataSource):
        points = ColumnDataSource(points, name="pareto-points")
    if not isinstance(frontier, ColumnDataSource):
        frontier = ColumnDataSource(frontier, name="pareto-frontier")
    fig = figure(title="Sweep: goodput against p99 latency (up and left is better; line = Pareto frontier)",
                 height=height, sizing_mode="stretch_width", tools="pan,wheel_zoom,box_zoom,reset,save",
                 name="pareto-figure")
    fig.step(x="x", y="y", source=frontier, mode="after", line_width=2, color="#1f77b4", name="glyph-frontier")
    r = fig.scatter(x="x", y="y", source=points, size="size", fill_color="color", line_color="line_color",
                    line_width=2, name="glyph-pareto-points")
    fig.add_tools(HoverTool(renderers=[r], tooltips=[("setting", "@label"), ("p99", "@x{0.0} ms"),
                                                     ("goodput", "@y{0.00} req/s"), ("on the frontier", "@pareto"),
                                                     ("current", "@current")]))
    if slo_x is not None and math.isfinite(slo_x):
        fig.add_layout(Span(location=slo_x, dimension="height", line_color="#d62728", line_dash="dashed",
                            line_width=1.5, name="slo-line"))
    fig.xaxis.axis_label, fig.yaxis.axis_label = x_label, y_label
    fig.toolbar.logo = None
    return fig


def histogram_figure(source: Any, title: str, *, slo_ms: float | None = None, height: int = 220, name: str = ""):
    """A latency histogram with the SLO as a dashed line."""
    from bokeh.models import ColumnDataSource, Span
    from bokeh.plotting import figure

    if not isinstance(source, ColumnDataSource):
        source = ColumnDataSource(source)
    fig = figure(title=title, height=height, sizing_mode="stretch_width", tools="save", name=name or None)
    fig.quad(left="left", right="right", bottom=0, top="top", source=source, fill_color="#6baed6",
             line_color="#ffffff")
    span = Span(location=slo_ms if slo_ms is not None else 0, dimension="height", line_color="#d62728",
                line_dash="dashed", line_width=1.5, visible=slo_ms is not None, name="slo-span")
    fig.add_layout(span)
    fig.xaxis.axis_label, fig.yaxis.axis_label = "ms", "count"
    fig.toolbar.logo = None
    return fig
