"""Bokeh figures over ColumnDataSources whose columns come from `workbench.ui.data`.

Each builder takes the source(s) it draws and returns the figure; nothing here
reads telemetry. Sources carry a `name` so a browser test can find them in
`Bokeh.documents` and read back what is drawn.
"""

from __future__ import annotations

from bokeh.models import BasicTicker, ColumnDataSource, DataRange1d, FixedTicker, HoverTool, Range1d
from bokeh.plotting import figure

from .data import CELL, PHASE_COLORS, Columns, grid_shape

TOOLS = "pan,wheel_zoom,box_zoom,reset,save"


def source(name: str, columns: Columns) -> ColumnDataSource:
    return ColumnDataSource(data={k: list(v) for k, v in columns.items()}, name=name)


def _style(fig) -> None:
    fig.toolbar.logo = None
    fig.title.text_font_size = "12px"
    fig.xgrid.grid_line_color = None
    fig.ygrid.grid_line_color = None
    fig.min_border_left = 40


def slot_figure(cells: ColumnDataSource, window_steps: int, max_batch: int, height: int = 280):
    """Heatmap of batch slot x step, coloured by request; prefill chunks pale.

    Both ranges are fixed (the dashboard's planner moves them): slots 0..max_batch-1 top to bottom,
    and the last `window_steps` steps, never below step 0, so one request does not auto-range to
    slots -2..2 and 256 slots still fit.
    """
    fig = figure(title="Batch slots per step (pale = prefill chunk, solid = decode)", tools=TOOLS,
                 height=height, sizing_mode="stretch_width", name="slot-figure",
                 x_range=Range1d(-0.5, window_steps - 0.5), y_range=Range1d(max_batch - 0.5, -0.5))
    # no per-cell hatch patterns: BokehJS builds a canvas per patterned glyph on every update
    fig.rect(x="step", y="slot", width=0.92, height=0.9, source=cells, fill_color="color", fill_alpha="alpha",
             line_color=None, name="glyph-slot-cells")
    fig.add_tools(HoverTool(tooltips=[("step", "@step"), ("slot", "@slot"), ("request", "@request_id"),
                                      ("kind", "@kind"), ("tokens", "@num_tokens")]))
    fig.xaxis.axis_label = "step"
    fig.yaxis.axis_label = "batch slot"
    fig.yaxis.ticker = BasicTicker(min_interval=1, desired_num_ticks=8)
    fig.xaxis.ticker = BasicTicker(min_interval=1)
    _style(fig)
    return fig


def kv_figure(cells: ColumnDataSource, capacity: int, block_size: int, height: int = 280):
    """Every physical KV block: tinted by owner, a bar showing its fill, shared prefix blocks outlined."""
    ncols, nrows = grid_shape(capacity)
    fig = figure(title=f"KV blocks ({capacity} x {block_size} tokens; bar = fill, black outline = shared prefix)",
                 tools="hover,save", height=height, sizing_mode="stretch_width", name="kv-figure",
                 x_range=Range1d(-0.5, ncols - 0.5), y_range=Range1d(nrows - 0.5, -0.5))
    fig.rect(x="x", y="y", width=CELL, height=CELL, source=cells, fill_color="color", fill_alpha="alpha",
             line_color="line_color", line_width="line_width", name="glyph-kv-cells")
    fig.rect(x="x", y="bar_y", width=CELL, height="bar_h", source=cells, fill_color="color", line_color=None,
             name="glyph-kv-fill")
    fig.select_one(HoverTool).tooltips = [("block", "@block"), ("state", "@state"), ("owner(s)", "@owners"),
                                          ("fill", f"@fill / {block_size} tokens")]
    fig.select_one(HoverTool).renderers = [fig.renderers[0]]
    fig.axis.visible = False
    _style(fig)
    return fig


def timeline_figure(bars: ColumnDataSource, chunks: ColumnDataSource, ticks: ColumnDataSource,
                    marks: ColumnDataSource, height: int = 300):
    """Gantt view: waiting and active bars per request, prefill chunks, a tick per token, preemptions, ends."""
    fig = figure(title="Requests over time (grey = queued, tint = in batch, dark = prefill chunk, | = token, "
                       "x = preempted, o = finished)", tools=TOOLS, height=height, sizing_mode="stretch_width",
                 name="timeline-figure", y_range=Range1d(9.5, -0.5), x_range=DataRange1d(range_padding=0.02))
    r_bars = fig.hbar(y="row", left="left", right="right", height=0.7, source=bars, fill_color="color",
                      fill_alpha="alpha", line_color=None, name="glyph-timeline-bars")
    r_chunks = fig.hbar(y="row", left="left", right="right", height=0.7, source=chunks, fill_color="color",
                        fill_alpha=0.9, line_color=None, name="glyph-timeline-chunks")
    r_ticks = fig.scatter(x="t", y="row", source=ticks, marker="dash", angle=1.5708, size=11, line_color="#222222",
                          line_width=1.2, name="glyph-timeline-ticks")
    r_marks = fig.scatter(x="t", y="row", source=marks, marker="marker", size=9, fill_color="color",
                          line_color="color", name="glyph-timeline-marks")
    fig.x_range.renderers = [r_bars]  # bars span each request's life; old ticks must not stretch the axis
    fig.add_tools(HoverTool(renderers=[r_bars], tooltips=[
        ("request", "@request_id"), ("bar", "@phase"), ("status", "@status"), ("TTFT", "@ttft"),
        ("per-token latency (mean)", "@gap"), ("tokens", "@tokens")]))
    fig.add_tools(HoverTool(renderers=[r_chunks], tooltips=[
        ("request", "@request_id"), ("prefill chunk", "@num_tokens tokens at step @step")]))
    fig.add_tools(HoverTool(renderers=[r_ticks], tooltips=[
        ("request", "@request_id"), ("token", "#@index"), ("latency", "@latency_ms ms since the previous")]))
    fig.add_tools(HoverTool(renderers=[r_marks], tooltips=[("request", "@request_id"), ("", "@label")]))
    fig.yaxis.ticker = FixedTicker(ticks=[])
    fig.xaxis.axis_label = "seconds since the engine started"
    _style(fig)
    return fig


def span_figure(quads: ColumnDataSource, height: int = 220):
    """Each step's host phases and its compute span (GPU, or a CPU compute worker) on the engine's clock.

    Two lanes side by side in time: an overlapped loop shows step N+1's host work under step N's
    compute; a sync loop on a CPU records no compute span, and its host lane is the whole step.
    """
    fig = figure(title="Host / compute lanes of recent steps", tools=TOOLS, height=height,
                 sizing_mode="stretch_width", name="span-figure", y_range=Range1d(1.6, -0.6),
                 x_range=DataRange1d(range_padding=0.01))
    fig.quad(left="left", right="right", bottom="bottom", top="top", source=quads, fill_color="color",
             line_color="#ffffff", line_width=0.5, name="glyph-span-quads")
    fig.add_tools(HoverTool(tooltips=[("step", "@step"), ("phase", "@phase"), ("duration", "@ms ms")]))
    fig.yaxis.ticker = FixedTicker(ticks=[0, 1])
    fig.yaxis.major_label_overrides = {0: "host (loop)", 1: "compute"}
    fig.xaxis.axis_label = "seconds since the engine started"
    _style(fig)
    return fig


def step_figure(bars: ColumnDataSource, span_steps: int, height: int = 220):
    """Per-step milliseconds on a log axis: host phases stacked (left bar), compute span (right bar).

    On a CPU the forward is ~99% of a step; on a log axis schedule, prepare and postprocess stay
    readable beside it.
    """
    fig = figure(title="Milliseconds per step (log scale; left = loop phases stacked, right = compute span)",
                 tools=TOOLS, height=height, sizing_mode="stretch_width", name="step-figure", y_axis_type="log",
                 x_range=Range1d(-0.5, span_steps - 0.5), y_range=DataRange1d(range_padding=0.1))
    fig.vbar(x="x", bottom="bottom", top="top", width=0.38, source=bars, fill_color="color", line_color=None,
             legend_field="phase", name="glyph-step-bars")
    fig.add_tools(HoverTool(tooltips=[("step", "@step"), ("phase", "@phase"), ("duration", "@ms ms")]))
    fig.xaxis.axis_label = "step"
    fig.yaxis.axis_label = "ms"
    fig.legend.label_text_font_size = "10px"
    fig.legend.spacing = 0
    fig.legend.padding = 4
    fig.add_layout(fig.legend[0], "right")  # beside the plot: bars stay visible under it
    _style(fig)
    return fig


__all__ = ["source", "slot_figure", "kv_figure", "timeline_figure", "span_figure", "step_figure", "PHASE_COLORS"]
