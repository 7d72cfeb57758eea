"""The live dashboard: one object, shown in a JupyterLab cell or served by `workbench serve`.

The engine appends to its telemetry; ~10 times a second `tick` takes one
snapshot of it, asks the pure planner (`workbench.ui.planner.plan`) what to
draw, and `_apply`s that plan: one `stream`, `patch` or `replace` per source
inside `pn.io.hold()`, plus texts, axis ranges and widget values.

Nothing here waits on the engine. Widget callbacks only post: a slider posts
the whole desired config with `engine.reconfigure(wait=False)` (last write
wins), and the readout shows it as pending until the engine has applied it at
a step boundary; until then the tick never moves the widgets back to an older
applied config. Streamed text reaches its output card from an asyncio task on
the loop that submitted it (the server's or the kernel's); the tick renders it.

A Dashboard holds Bokeh models, which live in one document: display each
Dashboard once, and make a new one for another view (the server does that
per browser session).

Panel internals: two remain, both for notebooks, both in the section
"Panel internals" at the end (Panel has no public API for either).
"""

from __future__ import annotations

import asyncio
import html
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import panel as pn
import param
from bokeh.model import Model
from bokeh.models import Div, InlineStyleSheet

from ..config import LIVE_FIELDS
from ..request import StreamChunk
from . import data, planner
from .plots import kv_figure, slot_figure, source, span_figure, step_figure, timeline_figure

if TYPE_CHECKING:
    from ..engine import Engine
    from ..handle import RequestHandle

log = logging.getLogger(__name__)

BURST_PROMPTS = (
    "Write a haiku about a busy kitchen.",
    "What is continuous batching? One sentence.",
    "Name three planets and one fact about each.",
    "Give me a short tip for learning a language.",
    "Why is the sea salty?",
    "Write a two-line poem about tea.",
    "List five colours.",
    "Explain what a KV cache is to a child.",
    "What is 17 times 3?",
    "Describe a sunrise in one sentence.",
    "Suggest a name for a grey cat.",
    "Tell me a fun fact about octopuses.",
)
# Burst requests ask for different lengths, so short ones finish and make room while long ones stream.
BURST_LENGTH_FRACTIONS = (1.0, 0.25, 0.5, 0.75, 0.35, 0.9)
# Widgets of the live config, by field (overlap has its own toggle).
SLIDER_FIELDS = ("max_batch", "num_blocks", "token_budget", "decode_steps")
# A streaming card's text is re-sent at most this often: every Div change re-lays out the whole page in
# BokehJS, and a dozen cards at the tick's 10 Hz kept a browser on a loaded 2-core machine from keeping up.
CARD_TEXT_S = 0.4

CSS = """
.wb-counters {display:flex; flex-wrap:wrap; gap:6px; font-family:sans-serif;}
.wb-counter {border:1px solid #ddd; border-radius:6px; padding:3px 9px; min-width:74px; background:#fafafa;}
.wb-counter .v {font-size:17px; font-weight:600;}
.wb-counter .k {font-size:10px; color:#666; text-transform:uppercase;}
.wb-config {font-family:monospace; font-size:12px; color:#333;}
.wb-out {font-family:sans-serif; font-size:12px; border-left:4px solid #ccc; padding:2px 6px; margin:0;}
.wb-out pre {white-space:pre-wrap; margin:2px 0; font-size:12px; max-height:160px; overflow:auto;}
.wb-out .h {color:#555;}
.wb-alert {color:#842029; background:#f8d7da; border:1px solid #f5c2c7; border-radius:4px; padding:4px 8px;
           font-family:sans-serif; font-size:12px;}
"""


class _Text:
    """Dynamic HTML as a raw Bokeh Div inside a Bokeh pane.

    Panel's HTML pane re-sends its stylesheets with every new `object`, and in a
    notebook those point at Panel's CDN; a Div's `text` change sends only the text,
    so the notebook stays offline. `.object` mirrors the pane API.
    """

    __slots__ = ("div", "panel")

    def __init__(self, visible: bool = True) -> None:
        self.div = Div(text="", sizing_mode="stretch_width", stylesheets=[InlineStyleSheet(css=CSS)],
                       visible=visible)
        self.panel = pn.pane.Bokeh(self.div, sizing_mode="stretch_width")

    @property
    def object(self) -> str:
        return self.div.text

    @object.setter
    def object(self, text: str) -> None:
        if text != self.div.text:
            self.div.text = text

    @property
    def visible(self) -> bool:
        return self.div.visible

    @visible.setter
    def visible(self, value: bool) -> None:
        if value != self.div.visible:
            self.div.visible = value


def _take_final(out: "_Output", handle: "RequestHandle | None") -> None:
    """A card no event loop streams (submitted outside one) shows its request's final text once it ends."""
    if out.streamed or out.reason is not None or handle is None or handle.output is None:
        return
    o = handle.output
    out.text, out.tokens, out.reason, out.error = o.text, len(o.token_ids), o.finish_reason, o.error
    out.version += 1


@dataclass(slots=True)
class _Output:
    """One submitted request's text: filled by its consumer task (or at the end), rendered by the tick."""

    request_id: str
    prompt: str
    text: str = ""
    tokens: int = 0
    reason: str | None = None
    error: str | None = None
    streamed: bool = True
    version: int = 0
    task: Any = None
    handle: Any = None  # its RequestHandle: a card no loop streams takes the final text from it

    def add(self, chunk: StreamChunk) -> None:
        self.text += chunk.text
        self.tokens += len(chunk.token_ids)
        if chunk.finished:
            self.reason, self.error = chunk.finish_reason, chunk.error
        self.version += 1

    def html(self, live_state: str = "streaming") -> str:
        """The card; `live_state` (queued / streaming / preempted) labels a request that has not ended."""
        state = live_state if self.reason is None else self.reason
        err = f" - {html.escape(self.error)}" if self.error else ""
        color = data.request_color(self.request_id)
        return (f'<div class="wb-out" style="border-left-color:{color}" data-rid="{self.request_id}">'
                f'<span class="h"><b>{self.request_id}</b> <span data-testid="state">{state}</span>{err} '
                f'&middot; <span data-testid="tokens">{self.tokens}</span> tokens &middot; '
                f'{html.escape(self.prompt[:60])}</span>'
                f'<pre data-testid="output-text">{html.escape(self.text)}</pre></div>')


class _Card:
    """One output card: the text, a cancel button, and the row holding both (created once, then reused)."""

    __slots__ = ("pane", "cancel", "row", "shown", "at")

    def __init__(self, on_cancel: Any) -> None:
        self.pane = _Text()
        self.cancel = pn.widgets.Button(label="cancel", color="light", width=70, height=32)
        self.cancel.on_click(lambda _e: on_cancel(self))
        self.row = pn.Row(self.pane.panel, self.cancel, sizing_mode="stretch_width", visible=False)
        self.shown: tuple[str, int, str] | None = None
        self.at = 0.0  # when its text was last sent


class Dashboard(pn.viewable.Viewer):
    """Live view of an engine: batch slots, KV blocks, request timelines, step spans, counters, controls."""

    period_ms = param.Integer(default=100, bounds=(20, 5000), doc="How often telemetry is drained (ms).")

    def __init__(self, engine: "Engine", *, window_steps: int = 300, span_steps: int = 40, timeline_rows: int = 16,
                 max_outputs: int = 8, max_new_tokens: int = 48, **params: Any) -> None:
        super().__init__(**params)
        self.engine = engine
        self.max_outputs = max_outputs
        cfg = engine.config
        self.options = planner.Options(capacity=engine.capacity, block_size=cfg.block_size,
                                       device=engine.device.type, t0=engine.telemetry.t0,
                                       window_steps=window_steps, span_steps=span_steps, timeline_rows=timeline_rows)
        self.state = planner.new_state(self.options, _live(cfg))
        self._outputs: dict[str, _Output] = {}
        self._syncing = False
        self._callback: Any = None
        self.ticks = 0

        window, _, _ = data.slot_window(-1, cfg.max_batch, window_steps)
        self.sources = {
            "slots": source("slot-cells", data.slot_cells([])),
            "kv": source("kv-cells", self.state.kv_cols),
            "bars": source("timeline-bars", data.timeline_bars([], 0.0, 0.0)),
            "chunks": source("timeline-chunks", data.prefill_chunks([], {}, 0.0)),
            "ticks": source("timeline-ticks", data.token_ticks([], {}, 0.0)),
            "marks": source("timeline-marks", data.timeline_marks([], 0.0)),
            "spans": source("span-quads", data.span_quads([], 0.0)),
            "steps": source("step-bars", data.step_bars([])),
        }
        s = self.sources
        self.figures = {
            "slots": slot_figure(s["slots"], window, cfg.max_batch),
            "kv": kv_figure(s["kv"], engine.capacity, cfg.block_size),
            "timeline": timeline_figure(s["bars"], s["chunks"], s["ticks"], s["marks"]),
            "steps": step_figure(s["steps"], span_steps),
            "spans": span_figure(s["spans"]),
        }
        self._build_widgets(max_new_tokens)
        self.layout = self._build_layout()

    # ================================================================ widgets and layout
    def _build_widgets(self, max_new_tokens: int) -> None:
        cfg, engine = self.engine.config, self.engine
        limit = max(2, engine.max_model_len // 2)
        self.prompt = pn.widgets.TextAreaInput(label="Prompt", placeholder="Ask the model something...", rows=3,
                                               value="Write a short poem about the sea.", sizing_mode="stretch_width")
        self.max_new_tokens = pn.widgets.IntSlider(label="max new tokens", start=1, end=min(512, limit),
                                                   value=min(max_new_tokens, limit), sizing_mode="stretch_width")
        self.submit_button = pn.widgets.Button(label="Submit", color="primary", width=90)
        self.burst_size = pn.widgets.IntInput(value=6, start=1, end=64, width=70, css_classes=["wb-burst-size"],
                                              description="how many requests one Burst submits")
        self.burst_button = pn.widgets.Button(label="Burst", color="success", width=90,
                                              description="Submit N varied prompts at once, of varied lengths")
        self.max_batch = pn.widgets.IntSlider(label="max batch", start=1, end=max(64, cfg.max_batch),
                                              value=cfg.max_batch, sizing_mode="stretch_width")
        self.num_blocks = pn.widgets.IntSlider(label="usable KV blocks", start=1, end=engine.capacity,
                                               value=cfg.num_blocks, sizing_mode="stretch_width")
        self.token_budget = pn.widgets.IntSlider(label="token budget per step", start=1,
                                                 end=max(2048, cfg.token_budget), value=cfg.token_budget,
                                                 sizing_mode="stretch_width")
        # decode runs: while the batch holds still, this many decode steps are planned and launched at once
        # (less host work per token; tokens arrive in bursts)
        self.decode_steps = pn.widgets.IntSlider(label="decode steps per launch", start=1,
                                                 end=max(16, cfg.decode_steps), value=cfg.decode_steps,
                                                 sizing_mode="stretch_width")
        self.policy = pn.widgets.RadioButtonGroup(label="policy", options=["continuous", "static", "sequential"],
                                                  value=cfg.policy)
        self.prefix_caching = pn.widgets.Checkbox(label="prefix caching", value=cfg.prefix_caching)
        self._overlap_live = "overlap" in LIVE_FIELDS and cfg.overlap is not None
        lane = "the GPU" if engine.device.type == "cuda" else "the CPU's compute worker"
        why = (f"sync vs overlapped loop: the host prepares step N+1 while {lane} runs step N" if self._overlap_live
               else f"this engine was built with overlap={cfg.overlap!r}, so its loop cannot be switched live")
        self.overlap = pn.widgets.RadioButtonGroup(label="loop", options=["sync", "overlap"],
                                                   value="overlap" if cfg.overlap else "sync",
                                                   disabled=not self._overlap_live, description=why)
        self.alert = _Text(visible=False)
        self.counters_pane = _Text()
        self.config_pane = _Text()
        self.spans_note = _Text()
        # Cards are created up front and reused (newest on top), so a running dashboard rarely creates a
        # Panel model; the pool grows only when more requests are live than it holds.
        self._cards: list[_Card] = []
        self.outputs_column = pn.Column(sizing_mode="stretch_width", max_height=520, scroll=True)
        self._grow_cards(max(self.max_outputs, 16))

        self.submit_button.on_click(lambda _e: self._submit_prompt())
        self.burst_button.on_click(lambda _e: self.burst(self.burst_size.value))
        for key in SLIDER_FIELDS:
            getattr(self, key).param.watch(lambda e, key=key: self._reconfigure(key, e.new), "value_throttled")
        self.policy.param.watch(lambda e: self._reconfigure("policy", e.new), "value")
        self.prefix_caching.param.watch(lambda e: self._reconfigure("prefix_caching", e.new), "value")
        self.overlap.param.watch(lambda e: self._reconfigure("overlap", e.new == "overlap"), "value")

    def _build_layout(self) -> pn.viewable.Viewable:
        e = self.engine
        title = pn.pane.HTML(
            f"<h3 style='margin:4px 0'>cb-workbench &middot; live dashboard</h3>"
            f"<span style='color:#555;font-family:sans-serif;font-size:12px'>model <b>{html.escape(e.loaded.name)}</b>"
            f" on {e.device.type}/{str(e.dtype).replace('torch.', '')} &middot; {e.capacity} KV blocks of "
            f"{e.config.block_size} tokens &middot; context {e.max_model_len}</span>", sizing_mode="stretch_width")
        controls = pn.Column(
            "#### Submit", self.prompt, self.max_new_tokens,
            pn.Row(self.submit_button, self.burst_button, pn.pane.HTML("&times;", margin=(12, 0, 0, 0)),
                   self.burst_size),
            "#### Engine (applied at the next step)", self.max_batch, self.num_blocks, self.token_budget,
            self.decode_steps, self.policy, self.prefix_caching, self.overlap, self.alert.panel,
            "#### Outputs", self.outputs_column, width=380)
        f = self.figures
        plots = pn.Column(
            self.counters_pane.panel,
            pn.Row(pn.pane.Bokeh(f["slots"], sizing_mode="stretch_width"),
                   pn.pane.Bokeh(f["kv"], sizing_mode="stretch_width"), sizing_mode="stretch_width"),
            pn.pane.Bokeh(f["timeline"], sizing_mode="stretch_width"),
            pn.Row(pn.pane.Bokeh(f["steps"], sizing_mode="stretch_width"),
                   pn.pane.Bokeh(f["spans"], sizing_mode="stretch_width"), sizing_mode="stretch_width"),
            self.spans_note.panel, sizing_mode="stretch_width")
        layout = _OneWayColumn(title, self.config_pane.panel, pn.Row(controls, plots, sizing_mode="stretch_width"),
                               sizing_mode="stretch_width", min_width=1100)
        layout._one_way_ids = self._one_way_ids()
        return layout

    def _one_way_ids(self) -> frozenset[str]:
        texts = (self.alert, self.counters_pane, self.config_pane, self.spans_note, *(c.pane for c in self._cards))
        return frozenset({m.id for fig in self.figures.values() for m in fig.select({"type": Model})}
                         | {t.div.id for t in texts})

    def _grow_cards(self, n: int) -> None:
        new = [_Card(self._cancel_card) for _ in range(n - len(self._cards))]
        if new:
            self._cards.extend(new)
            self.outputs_column.extend([c.row for c in new])
            if hasattr(self, "layout"):
                self.layout._one_way_ids = self._one_way_ids()

    def __panel__(self) -> pn.viewable.Viewable:
        self.start()
        return self.layout

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Any:
        """Displayed in a notebook cell: load Panel's extension inline first if nobody has (works offline)."""
        from panel.config import panel_extension

        if not panel_extension._loaded:
            pn.extension(inline=True)
        return super()._repr_mimebundle_(include, exclude)

    # ================================================================ lifecycle
    def start(self) -> None:
        """Start draining telemetry every `period_ms` (bound to the session when served)."""
        if self._callback is None:
            self.tick()
            self._callback = pn.state.add_periodic_callback(self.tick, period=self.period_ms)

    def stop(self) -> None:
        """Stop draining (the engine keeps running)."""
        if self._callback is not None:
            self._callback.stop()
            self._callback = None

    # ================================================================ callbacks: post, never wait
    def submit(self, prompt: Any, **sampling: Any) -> "RequestHandle":
        """Submit through the engine and give the request an output card that streams its text.

        A string is sent as one user message (the chat template applies), as the
        prompt box does; chats and token ids go as they are. Called inside a running
        event loop (a widget callback, a notebook cell), the text streams through a
        task on that loop; outside one, the card gets the final text when it ends.
        """
        label = prompt if isinstance(prompt, str) else _label(prompt)
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        out = _Output("", label, streamed=loop is not None)
        handle = self.engine.submit(prompt, on_done=lambda h, out=out: self._on_done(h, out), **sampling)
        out.request_id, out.handle = handle.request_id, handle
        self._add_output(out)
        if loop is not None:
            out.task = loop.create_task(self._consume(handle, out))
        return handle

    async def result(self, handle: "RequestHandle") -> Any:
        """The request's `RequestOutput`, once its card has all of its text."""
        out = self._outputs.get(handle.request_id)
        if out is not None and out.task is not None:
            await out.task
        while not handle.done:  # no streaming task (submitted outside a loop), or its card was recycled
            await asyncio.sleep(0.05)
        return handle.output

    def burst(self, n: int) -> list["RequestHandle"]:
        """Submit `n` varied prompts of varied lengths at once."""
        handles = []
        for i in range(n):
            frac = BURST_LENGTH_FRACTIONS[i % len(BURST_LENGTH_FRACTIONS)]
            handle = self._guarded(self.submit, BURST_PROMPTS[i % len(BURST_PROMPTS)],
                                   max_new_tokens=max(1, round(frac * self.max_new_tokens.value)))
            if handle is None:
                break
            handles.append(handle)
        return handles

    def _submit_prompt(self) -> None:
        if self.prompt.value.strip():
            self._guarded(self.submit, self.prompt.value, max_new_tokens=self.max_new_tokens.value)

    def _reconfigure(self, key: str, value: Any) -> None:
        """Post the whole desired config (every live widget, `key` at `value`); return at once.

        The whole config, not one field: the engine builds each post from its applied config, so
        two quick posts of different fields would otherwise undo each other. A KV size below what
        the largest live request may need is raised to it, with a visible note.
        """
        if self._syncing:
            return
        desired = self._desired()
        desired[key] = value
        note = None
        floor, who = data.kv_floor(self.state.log, self.options.block_size)
        floor = min(floor, self.options.capacity)
        if desired["num_blocks"] < floor:
            note = (f"usable KV blocks held at {floor}: {who} may grow to {floor} blocks, and a smaller cache "
                    "could never finish it (preemption cannot help), so the engine would end it with an error")
            desired["num_blocks"] = floor
            self._set_widgets({"num_blocks": floor})
        target = self.state.posted if self.state.posted is not None else _live(self.engine.config)
        if all(target.get(k) == v for k, v in desired.items()):
            self._show_alert(note)
            return
        new = self._guarded(self.engine.reconfigure, wait=False, **desired)
        if new is None:
            return
        self.state.posted = _live(new)
        self.config_pane.object = planner.config_html(_live(self.engine.config), self.state.posted,
                                                      self.options.capacity, self.state.kv_min)
        self._show_alert(note)
        log.info("dashboard: posted %s", desired)

    def _desired(self) -> dict[str, Any]:
        """The live config the widgets show now."""
        desired: dict[str, Any] = {k: getattr(self, k).value for k in SLIDER_FIELDS}
        desired["policy"], desired["prefix_caching"] = self.policy.value, self.prefix_caching.value
        if self._overlap_live:
            desired["overlap"] = self.overlap.value == "overlap"
        return desired

    def _guarded(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a submit/reconfigure; a ValueError goes to the alert pane instead of the log."""
        try:
            result = fn(*args, **kwargs)
        except (ValueError, RuntimeError) as exc:
            self._show_alert(str(exc))
            return None
        self._show_alert(None)
        return result

    def _show_alert(self, text: str | None) -> None:
        if text is not None:
            self.alert.object = f'<div class="wb-alert" data-testid="alert">{html.escape(text)}</div>'
        self.alert.visible = text is not None

    def _add_output(self, out: _Output) -> None:
        self._outputs[out.request_id] = out
        ended = [rid for rid, o in self._outputs.items() if o.reason is not None]
        for rid in ended[:-self.max_outputs]:
            del self._outputs[rid]

    def _card_for(self, request_id: str) -> tuple[Any, Any] | None:
        """The (text pane, cancel button) showing a request, if it is on screen."""
        for card in self._cards:
            if card.shown is not None and card.shown[0] == request_id:
                return card.pane, card.cancel
        return None

    def _cancel_card(self, card: _Card) -> None:
        if card.shown is not None:
            self.engine.cancel(card.shown[0])  # posts; the loop ends it at the next step boundary

    @staticmethod
    def _on_done(handle: "RequestHandle", out: _Output) -> None:
        """Engine thread: the request ended; only flag it (the consumer task or the tick renders)."""
        _take_final(out, handle)

    @staticmethod
    async def _consume(handle: "RequestHandle", out: _Output) -> None:
        async for chunk in handle.chunks():
            out.add(chunk)

    # ================================================================ the tick: snapshot, plan, apply
    def tick(self) -> None:
        """Take one telemetry snapshot, plan the view from it, apply the plan."""
        if not _notebook_comm_open(self.layout):
            return  # nothing is drained, so nothing is lost: the next tick takes it all
        st = self.state
        for out in list(self._outputs.values()):  # on_done runs after the step; a finished handle is final now
            _take_final(out, out.handle)
        snap = self.engine.telemetry.snapshot(st.last_step, st.last_seq)
        self._apply(planner.plan(st, snap, _live(self.engine.config), self.options))
        self.ticks += 1
        _push(self.layout)

    def _apply(self, plan: planner.Plan) -> None:
        """Copy a plan into the models: one stream / patch / replace per source, in one hold."""
        f = self.figures
        with pn.io.hold():
            for u in plan.updates:
                src = self.sources[u.source]
                if u.op == "stream":
                    if u.columns and next(iter(u.columns.values())):
                        src.stream(u.columns, rollover=u.rollover)
                elif u.op == "patch":
                    src.patch(u.columns)
                else:
                    src.data = u.columns
            if plan.slot_view is not None:
                x0, x1, y0, y1 = plan.slot_view
                f["slots"].x_range.update(start=x0, end=x1)
                f["slots"].y_range.update(start=y0, end=y1)
            if plan.step_view is not None:
                f["steps"].x_range.update(start=plan.step_view[0], end=plan.step_view[1])
            if plan.timeline_rows is not None:
                start, end, ticks, labels = plan.timeline_rows
                f["timeline"].y_range.update(start=start, end=end)
                f["timeline"].yaxis.ticker.ticks = ticks
                f["timeline"].yaxis.major_label_overrides = labels
            self.counters_pane.object = plan.counters_html
            self.spans_note.object = plan.spans_html
            if plan.config_html is not None:
                self.config_pane.object = plan.config_html
            if plan.widgets is not None:
                self._set_widgets(plan.widgets)
            if plan.kv_min is not None:
                self.num_blocks.start = min(plan.kv_min, self.num_blocks.value)
            self._render_cards(plan.states)

    def _set_widgets(self, cfg: dict[str, Any]) -> None:
        """Move the widgets to `cfg` without posting it again."""
        self._syncing = True
        try:
            for key in SLIDER_FIELDS:
                if key in cfg:
                    w = getattr(self, key)
                    v = cfg[key]
                    if v < w.start:  # set elsewhere below this slider's floor (the engine accepted it)
                        w.start = v
                    if w.value != v or w.value_throttled != v:
                        with param.edit_constant(w):  # value_throttled too, or dragging back to it would not fire
                            w.param.update(value=v, value_throttled=v)
            if "policy" in cfg:
                self.policy.value = cfg["policy"]
            if "prefix_caching" in cfg:
                self.prefix_caching.value = cfg["prefix_caching"]
            if cfg.get("overlap") is not None:
                self.overlap.value = "overlap" if cfg["overlap"] else "sync"
        finally:
            self._syncing = False

    def _render_cards(self, states: dict[str, str]) -> None:
        """Every live request's card (newest on top), then the newest ended; only changed cards are touched."""
        live = [rid for rid, o in self._outputs.items() if o.reason is None]
        ended = [rid for rid, o in self._outputs.items() if o.reason is not None]
        order = data.card_order(live, ended, self.max_outputs)
        if len(order) > len(self._cards):
            self._grow_cards(len(order) + 8)
        for i, card in enumerate(self._cards):
            out = self._outputs[order[i]] if i < len(order) else None
            if out is None:
                card.shown = None
                if card.row.visible:
                    card.row.visible = False
                continue
            state = states.get(out.request_id, "queued") if out.reason is None else out.reason
            key = (out.request_id, out.version, state)
            if key == card.shown:
                continue
            now = time.monotonic()
            if card.shown is not None and key[0::2] == card.shown[0::2] and now - card.at < CARD_TEXT_S:
                continue  # only more text: at most CARD_TEXT_S apart (each Div change re-lays out the page)
            card.shown, card.at = key, now
            card.pane.object = out.html(state)
            if card.cancel.disabled != (out.reason is not None):  # Panel parameters cost far more than a compare
                card.cancel.disabled = out.reason is not None
            if not card.row.visible:
                card.row.visible = True


def _live(cfg: Any) -> dict[str, Any]:
    """The live fields of an EngineConfig, as a dict."""
    return {k: getattr(cfg, k) for k in LIVE_FIELDS}


def _label(prompt: Any) -> str:
    """A short label for a chat or a token-id prompt."""
    if isinstance(prompt, (list, tuple)) and prompt:
        last = prompt[-1]
        return str(last.get("content", "")) if isinstance(last, dict) else f"{len(prompt)} token ids"
    return repr(prompt)[:60]


def _push(layout: Any) -> None:
    """In a notebook, raw Bokeh changes travel only when pushed over the comm; on a server this is a no-op."""
    if pn.state.curdoc is None or pn.state.curdoc.session_context is None:
        pn.io.push_notebook(layout)


# ================================================================ Panel internals (notebook only)
# Panel 1.9 offers no public API for these two notebook behaviours; both are kept here, and only here.
def _notebook_comm_open(layout: Any) -> bool:
    """False while a notebook view's comm is not open yet (always True on a server).

    Panel retries a push whose comm is not open every 0.1 s; several such
    retries can land out of order, and an out-of-order KV patch would leave
    the grid wrong. So the dashboard waits for the comm before draining.
    Private: `Viewable._models`, `pn.state._views` and the comm's `_comm`.
    """
    for ref in layout._models:
        view = pn.state._views.get(ref)
        comm = view[3] if view is not None else None
        if comm is not None and hasattr(comm, "_comm") and not comm._comm:
            return False
    return True


class _OneWayColumn(pn.Column):
    """The dashboard's root layout: in a notebook it ignores the frontend's echo of the plots.

    Panel 1.9's notebook comm applies each patch from the kernel and then sends the
    resulting document events back to the kernel. For a streamed or patched source
    that echo re-appends rows, or lands after a newer patch and reverts it, so the
    plots drift from telemetry. The plots and texts are driven by the kernel only,
    so the frontend's changes to them are dropped here; widget events pass through.
    (A served dashboard talks over Bokeh's websocket protocol, which has no echo.)
    Private: it overrides `_on_msg`, Panel's comm message hook.
    """

    def _on_msg(self, ref: str, manager: Any, msg: Any) -> None:
        content = msg.get("content") if isinstance(msg, dict) else None
        one_way = getattr(self, "_one_way_ids", None)
        if one_way and isinstance(content, dict) and isinstance(content.get("events"), list):
            content["events"] = [e for e in content["events"]
                                 if not (isinstance(e, dict) and (e.get("model") or {}).get("id") in one_way)]
        super()._on_msg(ref, manager, msg)
