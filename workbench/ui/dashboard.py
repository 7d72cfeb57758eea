"""The live dashboard: one object, shown in a JupyterLab cell or served by `workbench serve`.

The engine appends to its telemetry; the dashboard drains it ~10 times a
second (`tick`), turns the new records into plot columns with the pure
functions of `workbench.ui.data`, and applies them with one `stream` or
`patch` per source inside `pn.io.hold()`. Widget callbacks only move data:
into `engine.submit / cancel / reconfigure`. Streamed text reaches its output
pane from an asyncio task on the loop that submitted it (the server's or the
kernel's); the tick copies it into the pane, so panes update at tick rate too.

A Dashboard holds Bokeh models, which live in one document: display each
Dashboard once, and make a new one for another view (the server does that
per browser session).
"""

from __future__ import annotations

import asyncio
import html
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import panel as pn
import param
from bokeh.model import Model
from bokeh.models import Div, InlineStyleSheet

from ..config import LIVE_FIELDS
from ..request import StreamChunk
from ..telemetry import StepRecord
from . import data
from .plots import kv_figure, slot_figure, source, span_figure, timeline_figure

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

    def add(self, chunk: StreamChunk) -> None:
        self.text += chunk.text
        self.tokens += len(chunk.token_ids)
        if chunk.finished:
            self.reason, self.error = chunk.finish_reason, chunk.error
        self.version += 1

    def html(self) -> str:
        state = "streaming" if self.reason is None else self.reason
        err = f" - {html.escape(self.error)}" if self.error else ""
        color = data.request_color(self.request_id)
        return (f'<div class="wb-out" style="border-left-color:{color}" data-rid="{self.request_id}">'
                f'<span class="h"><b>{self.request_id}</b> <span data-testid="state">{state}</span>{err} '
                f'&middot; <span data-testid="tokens">{self.tokens}</span> tokens &middot; '
                f'{html.escape(self.prompt[:60])}</span>'
                f'<pre data-testid="output-text">{html.escape(self.text)}</pre></div>')


class _OneWayColumn(pn.Column):
    """The dashboard's root layout: in a notebook it ignores the frontend's echo of the plots.

    Panel 1.9's notebook comm applies each patch from the kernel and then sends the
    resulting document events back to the kernel. For a streamed or patched source
    that echo re-appends rows, or lands after a newer patch and reverts it, so the
    plots drift from telemetry. The plots and texts are driven by the kernel only,
    so the frontend's changes to them are dropped here; widget events pass through.
    (A served dashboard talks over Bokeh's websocket protocol, which has no echo.)
    """

    def _on_msg(self, ref: str, manager: Any, msg: Any) -> None:
        content = msg.get("content") if isinstance(msg, dict) else None
        one_way = getattr(self, "_one_way_ids", None)
        if one_way and isinstance(content, dict) and isinstance(content.get("events"), list):
            content["events"] = [e for e in content["events"]
                                 if not (isinstance(e, dict) and (e.get("model") or {}).get("id") in one_way)]
        super()._on_msg(ref, manager, msg)


class Dashboard(pn.viewable.Viewer):
    """Live view of an engine: batch slots, KV blocks, request timelines, CPU/GPU spans, counters, controls."""

    period_ms = param.Integer(default=100, bounds=(20, 5000), doc="How often telemetry is drained (ms).")

    def __init__(self, engine: "Engine", *, window_steps: int = 300, span_steps: int = 40, timeline_rows: int = 16,
                 max_outputs: int = 8, max_new_tokens: int = 48, **params: Any) -> None:
        super().__init__(**params)
        self.engine = engine
        self.window_steps, self.span_steps, self.timeline_rows = window_steps, span_steps, timeline_rows
        self.max_outputs = max_outputs
        tel = engine.telemetry
        self._t0 = tel.t0
        self._last_step = -1
        self._last_seq = -1
        self._context: dict[str, int] = {}
        self._log = data.RequestLog()
        self._recent: deque[StepRecord] = deque(maxlen=max(span_steps, 64))
        self._last_record: StepRecord | None = None
        self._preemptions = 0
        self._outputs: dict[str, _Output] = {}
        self._shown_config: tuple | None = None
        self._syncing = False
        self._rows_shown: tuple[int, ...] = ()
        self._callback: Any = None
        self._bars_active = False
        self._bars_at = 0.0
        self._marks_sent: data.Columns = {}
        self._kv_resync = False
        self._kv_key: tuple = ()
        self.ticks = 0

        cfg = engine.config
        bs, cap = cfg.block_size, engine.capacity
        self._kv_cols = data.kv_cells(None, cap, bs, {}, cfg.num_blocks)
        self.sources = {
            "slots": source("slot-cells", data.slot_cells([])),
            "kv": source("kv-cells", self._kv_cols),
            "bars": source("timeline-bars", data.timeline_bars([], 0.0, 0.0)),
            "chunks": source("timeline-chunks", data.prefill_chunks([], {}, 0.0)),
            "ticks": source("timeline-ticks", data.token_ticks([], {}, 0.0)),
            "marks": source("timeline-marks", data.timeline_marks([], 0.0)),
            "spans": source("span-quads", data.span_quads([], 0.0)),
        }
        s = self.sources
        self.figures = {
            "slots": slot_figure(s["slots"], window_steps, cfg.max_batch),
            "kv": kv_figure(s["kv"], cap, bs),
            "timeline": timeline_figure(s["bars"], s["chunks"], s["ticks"], s["marks"]),
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
        self.burst_size = pn.widgets.IntInput(value=6, start=1, end=64, width=70,
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
        self.policy = pn.widgets.RadioButtonGroup(label="policy", options=["continuous", "static", "sequential"],
                                                  value=cfg.policy)
        self.prefix_caching = pn.widgets.Checkbox(label="prefix caching", value=cfg.prefix_caching)
        overlap_live = "overlap" in LIVE_FIELDS and engine.device.type == "cuda" and cfg.overlap is not None
        why = ("sync vs overlapped loop (CPU prepares step N+1 while the GPU runs step N)" if overlap_live else
               "The overlapped loop needs a CUDA device and an engine built with overlap support; "
               f"this engine runs on {engine.device.type} with overlap={cfg.overlap!r}.")
        self.overlap = pn.widgets.RadioButtonGroup(label="loop", options=["sync", "overlap"],
                                                   value="overlap" if cfg.overlap else "sync",
                                                   disabled=not overlap_live, description=why)
        self.alert = _Text(visible=False)
        self.counters_pane = _Text()
        self.config_pane = _Text()
        self.spans_note = _Text()
        # A fixed set of output cards, created once: new requests move data into them (newest on top),
        # so no Panel model is created while the dashboard runs (in a notebook that would also fetch
        # the new models' stylesheets from a CDN).
        self._cards = []
        for i in range(self.max_outputs):
            pane = _Text()
            cancel = pn.widgets.Button(label="cancel", color="light", width=70, height=32)
            cancel.on_click(lambda _e, i=i: self._cancel_card(i))
            self._cards.append((pane, cancel, pn.Row(pane.panel, cancel, sizing_mode="stretch_width", visible=False)))
        self._cards_shown: list[tuple[str, int] | None] = [None] * self.max_outputs
        self.outputs_column = pn.Column(*(c[2] for c in self._cards), sizing_mode="stretch_width", max_height=520,
                                        scroll=True)

        self.submit_button.on_click(lambda _e: self._submit_prompt())
        self.burst_button.on_click(lambda _e: self.burst(self.burst_size.value))
        for w, key in ((self.max_batch, "max_batch"), (self.num_blocks, "num_blocks"),
                       (self.token_budget, "token_budget")):
            w.param.watch(lambda e, key=key: self._reconfigure(key, e.new), "value_throttled")
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
            self.policy, self.prefix_caching, self.overlap, self.alert.panel,
            "#### Outputs", self.outputs_column, width=380)
        f = self.figures
        plots = pn.Column(
            self.counters_pane.panel,
            pn.Row(pn.pane.Bokeh(f["slots"], sizing_mode="stretch_width"),
                   pn.pane.Bokeh(f["kv"], sizing_mode="stretch_width"), sizing_mode="stretch_width"),
            pn.pane.Bokeh(f["timeline"], sizing_mode="stretch_width"),
            pn.pane.Bokeh(f["spans"], sizing_mode="stretch_width"), self.spans_note.panel,
            sizing_mode="stretch_width")
        layout = _OneWayColumn(title, self.config_pane.panel, pn.Row(controls, plots, sizing_mode="stretch_width"),
                               sizing_mode="stretch_width", min_width=1100)
        texts = (self.alert, self.counters_pane, self.config_pane, self.spans_note, *(c[0] for c in self._cards))
        layout._one_way_ids = frozenset(
            {m.id for fig in self.figures.values() for m in fig.select({"type": Model})} | {t.div.id for t in texts})
        return layout

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

    # ================================================================ callbacks: move data only
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
        out.request_id = handle.request_id
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
        if self._syncing or getattr(self.engine.config, key, None) == value:
            return
        if self._guarded(self.engine.reconfigure, **{key: value}) is not None:
            log.info("dashboard: reconfigure %s=%r", key, value)

    def _guarded(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a submit/reconfigure; a ValueError goes to the alert pane instead of the log."""
        try:
            result = fn(*args, **kwargs)
        except (ValueError, RuntimeError) as exc:
            self.alert.object = f'<div class="wb-alert" data-testid="alert">{html.escape(str(exc))}</div>'
            self.alert.visible = True
            return None
        self.alert.visible = False
        return result

    def _add_output(self, out: _Output) -> None:
        self._outputs[out.request_id] = out
        for rid in list(self._outputs)[:-self.max_outputs]:
            del self._outputs[rid]

    def _card_for(self, request_id: str) -> tuple[Any, Any] | None:
        """The (text pane, cancel button) showing a request, if it is on screen."""
        for (pane, cancel, _row), shown in zip(self._cards, self._cards_shown):
            if shown is not None and shown[0] == request_id:
                return pane, cancel
        return None

    def _cancel_card(self, i: int) -> None:
        shown = self._cards_shown[i]
        if shown is not None:
            self.engine.cancel(shown[0])

    @staticmethod
    def _on_done(handle: "RequestHandle", out: _Output) -> None:
        """Engine thread: the request ended; only flag it (the consumer task or the tick renders)."""
        if not out.streamed and handle.output is not None:  # no event loop streamed it: show the final text
            o = handle.output
            out.text, out.tokens, out.reason, out.error = o.text, len(o.token_ids), o.finish_reason, o.error
            out.version += 1

    @staticmethod
    async def _consume(handle: "RequestHandle", out: _Output) -> None:
        async for chunk in handle.chunks():
            out.add(chunk)

    # ================================================================ the tick: drain, build, apply
    def tick(self) -> None:
        """Drain new telemetry and update every view: one stream/patch per source, inside one hold."""
        if not self._comm_ready():
            return  # nothing is drained, so nothing is lost: the next tick takes it all
        tel = self.engine.telemetry
        now = time.perf_counter()
        steps = tel.steps(self._last_step)
        events = tel.events(self._last_seq)
        first = self._last_step < 0 and self._last_seq < 0
        if steps:
            self._last_step = steps[-1].step
            self._last_record = steps[-1]
        if events:
            self._last_seq = events[-1].seq
        data.fold_context(self._context, steps)
        data.fold_requests(self._log, events)
        self._log.prune(4 * self.timeline_rows)
        self._recent.extend(steps[-self._recent.maxlen:])
        self._preemptions += sum(len(r.preempted) for r in steps)
        draw = steps[-self.window_steps:] if first else steps
        cfg = self.engine.config
        rows = self._log.recent(self.timeline_rows)
        by_id = {s.request_id: s for s in rows}
        t0 = self._t0

        updates: list[tuple[str, str, Any]] = []
        if draw:
            updates.append(("slots", "stream", data.slot_cells(draw)))
            updates.append(("chunks", "stream", data.prefill_chunks(draw, by_id, t0)))
            updates.append(("spans", "stream", data.span_quads(draw[-self.span_steps:], t0)))
        kv_key = (self._last_step, cfg.num_blocks)
        if kv_key != self._kv_key or self._kv_resync:
            kv_new = data.kv_cells(self._last_record, self.engine.capacity, cfg.block_size, self._context,
                                   cfg.num_blocks)
            self._kv_key = kv_key
        else:
            kv_new = self._kv_cols
        patch = data.column_patch(self._kv_cols, kv_new)
        if patch:
            self._kv_cols = kv_new
            updates.append(("kv", "patch", patch))
            self._kv_resync = True
        elif self._kv_resync and not steps and self._last_record is not None and now - self._last_record.t_end > 1.0:
            # The engine has been quiet for a second: send the whole grid once, so a view that
            # ever missed a patch is exact again (patches carry only changes).
            self._kv_resync = False
            updates.append(("kv", "replace", {k: list(v) for k, v in kv_new.items()}))
        # Bars change shape on request events; while requests run they also grow towards "now",
        # which is redrawn at ~2 Hz: smooth enough, and a fifth of the serializing.
        active = any(s.end is None for s in rows)
        milestones = any(e.kind not in ("token", "first_token") for e in events)
        if milestones or (self._bars_active and not active) or (active and now - self._bars_at >= 0.5):
            updates.append(("bars", "replace", data.timeline_bars(rows, t0, now)))
            self._bars_active, self._bars_at = active, now
        if events:
            updates.append(("ticks", "stream", data.token_ticks(
                [e for e in events if e.request_id in by_id], by_id, t0)))
        if milestones:
            marks = data.timeline_marks(rows, t0)
            if marks != self._marks_sent:
                updates.append(("marks", "replace", marks))
                self._marks_sent = marks
        counters = data.counters(list(self._recent), self._log, self._preemptions, now)
        if self._last_record is None:
            counters.free_blocks = counters.num_blocks = cfg.num_blocks
        busy = data.gpu_busy(list(self._recent)[-self.span_steps:])
        fwd = data.forward_share(list(self._recent)[-self.span_steps:])
        config_key = tuple(getattr(cfg, k) for k in LIVE_FIELDS) + (cfg.overlap,)

        with pn.io.hold():
            for name, op, cols in updates:
                src = self.sources[name]
                if op == "stream":
                    if cols and next(iter(cols.values())):
                        src.stream(cols, rollover=self._rollover(name))
                elif op == "patch":
                    src.patch(cols)
                else:
                    src.data = cols
            self._update_rows(rows)
            self.counters_pane.object = _counters_html(counters)
            self.spans_note.object = _spans_html(busy, fwd, self.engine.device.type)
            if config_key != self._shown_config:
                self._shown_config = config_key
                self._sync_config(cfg)
            self._render_cards()
        self.ticks += 1
        self._push()

    def _render_cards(self) -> None:
        """Newest request on top; only cards whose request or text changed are touched."""
        newest = list(reversed(self._outputs.values()))
        for i, (pane, cancel, row) in enumerate(self._cards):
            out = newest[i] if i < len(newest) else None
            key = None if out is None else (out.request_id, out.version)
            if key == self._cards_shown[i]:
                continue
            self._cards_shown[i] = key
            if out is None:
                if row.visible:
                    row.visible = False
                continue
            pane.object = out.html()
            if cancel.disabled != (out.reason is not None):  # Panel parameters cost far more than a compare
                cancel.disabled = out.reason is not None
            if not row.visible:
                row.visible = True

    def _comm_ready(self) -> bool:
        """False while a notebook view's comm is not open yet.

        Panel retries a push whose comm is not open every 0.1 s; several such
        retries can land out of order, and an out-of-order KV patch would leave
        the grid wrong. So the dashboard waits for the comm before draining.
        """
        for ref in self.layout._models:
            view = pn.state._views.get(ref)
            comm = view[3] if view is not None else None
            if comm is not None and hasattr(comm, "_comm") and not comm._comm:
                return False
        return True

    def _rollover(self, name: str) -> int:
        cap = max(self.engine.config.max_batch, 8)
        return {"slots": self.window_steps * min(cap, 32), "spans": 5 * self.span_steps,
                "chunks": 400, "ticks": 4000}.get(name, 2000)

    def _update_rows(self, rows: list[data.RequestSummary]) -> None:
        shown = tuple(s.row for s in rows)
        if shown == self._rows_shown or not rows:
            return
        self._rows_shown = shown
        fig = self.figures["timeline"]
        first, last = rows[0].row, rows[-1].row
        fig.y_range.update(start=max(last, first + self.timeline_rows - 1) + 0.5, end=first - 0.5)
        fig.yaxis.ticker.ticks = list(shown)
        fig.yaxis.major_label_overrides = {s.row: s.request_id for s in rows}

    def _sync_config(self, cfg: Any) -> None:
        """Show the engine's live config and move the widgets to it (without reconfiguring again)."""
        self.config_pane.object = _config_html(cfg, self.engine.capacity)
        self._syncing = True
        try:
            for w, v in ((self.max_batch, cfg.max_batch), (self.num_blocks, cfg.num_blocks),
                         (self.token_budget, cfg.token_budget)):
                with param.edit_constant(w):  # value_throttled too, or dragging back to it would not fire
                    w.param.update(value=v, value_throttled=v)
            self.policy.value = cfg.policy
            self.prefix_caching.value = cfg.prefix_caching
        finally:
            self._syncing = False

    def _push(self) -> None:
        """In a notebook, raw Bokeh changes travel only when pushed over the comm; on a server this is a no-op."""
        if pn.state.curdoc is None or pn.state.curdoc.session_context is None:
            pn.io.push_notebook(self.layout)


def _label(prompt: Any) -> str:
    """A short label for a chat or a token-id prompt."""
    if isinstance(prompt, (list, tuple)) and prompt:
        last = prompt[-1]
        return str(last.get("content", "")) if isinstance(last, dict) else f"{len(prompt)} token ids"
    return repr(prompt)[:60]


def _counters_html(c: data.Counters) -> str:
    items = [("running", c.running), ("waiting", c.waiting), ("ended", c.finished),
             ("tokens/s", f"{c.tokens_per_s:.1f}"), ("free blocks", f"{c.free_blocks}/{c.num_blocks}"),
             ("step time", "-" if c.step_ms is None else f"{c.step_ms:.0f} ms"), ("step", max(c.step, 0)),
             ("preemptions", c.preemptions), ("prefix hits", f"{100 * c.prefix_hit_rate:.0f}%")]
    cells = "".join(f'<div class="wb-counter"><div class="v" data-testid="counter-{k.split()[0].split("/")[0]}">'
                    f'{v}</div><div class="k">{k}</div></div>' for k, v in items)
    return f'<div class="wb-counters">{cells}</div>'


def _config_html(cfg: Any, capacity: int) -> str:
    parts = [f'max_batch=<b data-testid="cfg-max_batch">{cfg.max_batch}</b>',
             f'num_blocks=<b data-testid="cfg-num_blocks">{cfg.num_blocks}</b>/{capacity}',
             f'token_budget=<b data-testid="cfg-token_budget">{cfg.token_budget}</b>',
             f'policy=<b data-testid="cfg-policy">{cfg.policy}</b>',
             f'prefix_caching=<b>{cfg.prefix_caching}</b>', f'overlap=<b>{cfg.overlap}</b>']
    return '<div class="wb-config">engine config: ' + " &middot; ".join(parts) + "</div>"


def _spans_html(busy: float | None, fwd: float | None, device: str) -> str:
    if busy is not None:
        text = f"GPU busy over the last steps: <b data-testid='gpu-busy'>{100 * busy:.0f}%</b>"
    else:
        text = (f"GPU busy: <b data-testid='gpu-busy'>n/a</b> ({device}: no GPU spans recorded; "
                "the forward runs on the loop thread)")
    if fwd is not None:
        text += f" &middot; forward share of step time: <b>{100 * fwd:.0f}%</b>"
    return f"<span style='font-family:sans-serif;font-size:12px'>{text}</span>"
