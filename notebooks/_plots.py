"""Small matplotlib helpers shared by the tutorial notebooks.

Everything here is a pure function of `engine.telemetry` records (StepRecord,
RequestEvent) and draws static pictures for reading, not a product feature: the
live, interactive views are the dashboard's (`workbench.ui`).
"""

from __future__ import annotations

import math
import numpy as np
from matplotlib import colors as mcolors
from matplotlib.patches import Patch, Rectangle

from workbench.ui import data  # the dashboard's pure folds of telemetry (no Panel import)

KIND_CODE = {"idle": 0, "prefill": 1, "decode": 2, "padding": 3}
KIND_COLOR = ["#f2f2f2", "#f28e2b", "#4e79a7", "#e15759"]


# ----------------------------------------------------------------- bookkeeping
def tokens_in_cache(steps) -> list[dict[str, int]]:
    """For each step: the tokens each running request holds in the KV cache after it.

    The dashboard's own fold (`workbench.ui.data.fold_context`), taken after every step: a
    preempted request starts again from zero, a finished one drops out. Tokens served from the
    prefix cache are not counted (they were never pushed through the model by this request).
    """
    context: dict[str, int] = {}
    return [dict(data.fold_context(context, [s])) for s in steps]


def slot_lanes(steps, num_lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """Assign each request a fixed batch lane (lowest free lane when it first appears).

    Returns (kinds, owners): lanes x steps arrays of KIND_CODE values and owner indices
    (-1 for idle). A `padding` slot is drawn in the lane of a request that finished and
    whose lane nobody took yet, which is exactly where a static batch keeps it.
    """
    kinds = np.zeros((num_lanes, len(steps)), dtype=int)
    owners = -np.ones((num_lanes, len(steps)), dtype=int)
    lane_of: dict[str, int] = {}
    order: dict[str, int] = {}
    available = list(range(num_lanes))  # lanes nobody holds; the most recently vacated last
    for j, s in enumerate(steps):
        for slot in s.slots:
            if slot.kind == "padding":
                continue
            rid = slot.request_id
            order.setdefault(rid, len(order))
            if rid not in lane_of:
                lane = min(available) if available else num_lanes  # num_lanes: off the picture
                if lane in available:
                    available.remove(lane)
                lane_of[rid] = lane
            lane = lane_of[rid]
            if lane < num_lanes:
                kinds[lane, j] = KIND_CODE[slot.kind]
                owners[lane, j] = order[rid]
        pads = sum(1 for slot in s.slots if slot.kind == "padding")
        for lane in available[len(available) - pads:] if pads else []:
            kinds[lane, j] = KIND_CODE["padding"]
        for rid in s.finished + s.preempted:
            lane = lane_of.pop(rid, num_lanes)
            if lane < num_lanes:
                available.append(lane)
    return kinds, owners


# --------------------------------------------------------------------- drawing
def slot_heatmap(ax, steps, num_lanes: int, title: str = "", num_steps: int | None = None) -> None:
    """Batch lanes (rows) over steps (columns), coloured by what each slot did.

    `num_steps` fixes the x range, so several runs drawn one above the other compare by length.
    """
    kinds, owners = slot_lanes(steps, num_lanes)
    ax.imshow(kinds, aspect="auto", interpolation="nearest", cmap=mcolors.ListedColormap(KIND_COLOR),
              vmin=-0.5, vmax=3.5)
    for lane in range(num_lanes):  # thin white lines where one request hands the lane to the next
        for j in range(1, kinds.shape[1]):
            if owners[lane, j] >= 0 and owners[lane, j - 1] >= 0 and owners[lane, j] != owners[lane, j - 1]:
                ax.axvline(j - 0.5, ymin=1 - (lane + 1) / num_lanes, ymax=1 - lane / num_lanes, color="white", lw=1.5)
    ax.set_yticks(range(num_lanes), [f"slot {i}" for i in range(num_lanes)])
    ax.set_xlim(-0.5, (num_steps or len(steps)) - 0.5)
    ax.set_xlabel("engine step")
    ax.set_title(title, loc="left")


def kind_legend(fig, kinds=("prefill", "decode", "padding", "idle")) -> None:
    handles = [Patch(color=KIND_COLOR[KIND_CODE[k]], label=k) for k in kinds]
    fig.legend(handles=handles, loc="upper right", ncol=len(handles), frameon=False)


def kv_grid(ax, step, cols: int = 16, title: str | None = None, names: dict[str, int] | None = None) -> None:
    """The KV cache as a grid of blocks at the end of one step: colour = owning request, X = shared."""
    n = step.num_blocks
    rows = math.ceil(n / cols)
    palette = [mcolors.to_rgb(c) for c in ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948",
                                            "#ff9da7", "#9c755f", "#e15759", "#bab0ac")]
    owner = {b: who[0] for b, who in data.block_owners(step).items()}
    names = names if names is not None else {}
    for b in range(n):
        r, c = divmod(b, cols)
        if b in owner:
            idx = names.setdefault(owner[b], len(names))
            face = palette[idx % len(palette)]
        else:
            face = (0.95, 0.95, 0.95)
        ax.add_patch(Rectangle((c, rows - 1 - r), 0.92, 0.92, facecolor=face, edgecolor="none"))
        if b in step.shared_blocks:
            ax.text(c + 0.46, rows - 1 - r + 0.46, "×", ha="center", va="center", fontsize=9, color="black")
    ax.set_xlim(-0.1, cols)
    ax.set_ylim(-0.1, rows)
    ax.set_aspect("equal")
    ax.axis("off")
    used = n - step.num_free_blocks
    ax.set_title(title or f"step {step.step}: {used}/{n} blocks used", fontsize=9)


def attention_mask(slots, starts: dict[str, int]) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """The attention pattern of one flat ragged batch.

    Rows are the batch's query tokens back to back; columns are each request's keys
    (its cached context plus this step's tokens), request after request. A query at
    position p of request r sees r's keys 0..p and nothing of any other request.
    Returns the 0/1 mask and (request_id, first_row, first_col) for each request.
    """
    rows = sum(s.num_tokens for s in slots)
    cols = sum(starts[s.request_id] + s.num_tokens for s in slots)
    mask = np.zeros((rows, cols), dtype=np.int8)
    r0 = c0 = 0
    spans = []
    for s in slots:
        start = starts[s.request_id]
        for q in range(s.num_tokens):
            mask[r0 + q, c0 : c0 + start + q + 1] = 1
        spans.append((s.request_id, r0, c0))
        r0 += s.num_tokens
        c0 += start + s.num_tokens
    return mask, spans


PHASES = (("schedule_s", "schedule", "#76b7b2"), ("prepare_s", "prepare", "#f28e2b"),
          ("forward_s", "forward", "#4e79a7"), ("postprocess_s", "postprocess", "#e15759"))


def span_timeline(ax, steps, y: float = 0.0, height: float = 0.8, t0: float | None = None) -> float:
    """Each step's measured CPU phases laid out on the wall clock (milliseconds from t0)."""
    t0 = steps[0].t_start if t0 is None else t0
    for s in steps:
        t = s.t_start
        for attr, _, color in PHASES:
            d = getattr(s, attr)
            ax.broken_barh([(1e3 * (t - t0), 1e3 * d)], (y, height), facecolors=color, edgecolor="white", linewidth=0.5)
            t += d
    return t0


def phase_legend(ax) -> None:
    ax.legend(handles=[Patch(color=c, label=name) for _, name, c in PHASES], loc="lower right",
              bbox_to_anchor=(1.0, 1.0), ncol=4, frameon=False, fontsize=8)
