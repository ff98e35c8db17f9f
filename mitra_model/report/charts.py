"""The report page's plots: matplotlib figures rendered to inline SVG, byte-identical across runs.

No pyplot (no global figure state, no GUI backend): each chart is a `Figure` saved to SVG with
text kept as text, no date in the metadata and a hash salt per chart, so two charts on one page
never share an element id and the same manifest always gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import matplotlib
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure

from mitra_model.report.facts import ArtifactFacts

# green (far from the bound) -> amber (near it) -> red (past it); the scale ends at 1.5x the bound
_USED = LinearSegmentedColormap.from_list("tolerance_used", [(0, "#2da44e"), (0.5, "#d4a72c"), (0.67, "#cf222e"),
                                                              (1, "#82071e")])
_USED_MAX = 1.5

_Data = TypeVar("_Data")
_KEPT_CHARTS = 32


def _kept(chart: Callable[[_Data], str | None]) -> Callable[[_Data], str | None]:
    """`chart`, rendering each distinct input once per process and keeping the last few.

    A chart is a function of its data alone (byte-identical on every render), and the same release's
    pages are rendered again by every publish attempt after an interruption, and by index refreshes:
    matplotlib's layout and SVG writer were most of a publish's CPU time.
    """
    rendered: OrderedDict[str, str | None] = OrderedDict()

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        raise TypeError(type(value).__name__)

    @functools.wraps(chart)
    def render(data: _Data) -> str | None:
        key = json.dumps(data, sort_keys=True, default=plain)
        if key in rendered:
            rendered.move_to_end(key)
            return rendered[key]
        svg = rendered[key] = chart(data)
        if len(rendered) > _KEPT_CHARTS:
            rendered.popitem(last=False)
        return svg

    return render


def _svg(figure: Figure, chart: str) -> str:
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": f"mitra-build-{chart}", "svg.fonttype": "none"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": "mitra-build (matplotlib)"},
                       bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # inline: no XML declaration or DOCTYPE inside HTML


@_kept
def tolerance_heatmap(found: list[ArtifactFacts]) -> str | None:
    """Artifact x matrix cell: the share of its tolerance each cell uses (None: no per-cell record)."""
    rows = [a for a in found if a.verification.get("matrix")]
    if not rows:
        return None
    cells = list(dict.fromkeys(c["cell"] for a in rows for c in a.verification["matrix"]))
    values = []
    for a in rows:
        by_cell = {c["cell"]: c.get("tolerance_used") for c in a.verification["matrix"]}
        values.append([math.inf if by_cell.get(cell, 0.0) is None else by_cell.get(cell, math.nan) for cell in cells])
    figure = Figure(figsize=(1.2 + 0.62 * len(cells), 0.9 + 0.42 * len(rows)), layout="constrained")
    ax = figure.add_subplot()
    shown = [[min(v, _USED_MAX) for v in row] for row in values]
    image = ax.imshow(shown, cmap=_USED, vmin=0, vmax=_USED_MAX, aspect="auto")
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            label = "-" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.2f}")
            ax.text(j, i, label, ha="center", va="center", fontsize=7, color="white" if value > 0.6 else "black")
    ax.set_xticks(range(len(cells)), cells, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), [a.name for a in rows], fontsize=8)
    ax.set_title("Share of the tolerance used, per matrix cell (1.0 = at the bound)", fontsize=9)
    figure.colorbar(image, ax=ax, shrink=0.8).set_label("error / bound", fontsize=8)
    return _svg(figure, "heatmap")


@_kept
def size_speed_signal(found: list[ArtifactFacts]) -> str | None:
    """Each graph artifact as a point: size against CPU time, coloured by the signal it loses."""
    points = [a for a in found if a.relative_cpu_time is not None]
    if not points:
        return None
    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = figure.add_subplot()
    lost = [a.metric("max_err_over_spread") for a in points]
    colours = [0.0 if v is None else v for v in lost]
    scatter = ax.scatter([a.size / 1e6 for a in points], [a.relative_cpu_time for a in points], c=colours,
                         cmap="viridis_r", vmin=0, vmax=max(0.5, max(colours)), s=90, edgecolors="black")
    for a, v in zip(points, lost, strict=True):
        ax.annotate(f"{a.name}\n{'err/spread n/a' if v is None else f'err/spread {v:.3f}'}",
                    (a.size / 1e6, a.relative_cpu_time), textcoords="offset points", xytext=(6, 4), fontsize=7)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("CPU time over portable fp32")
    ax.set_title("Size, speed and signal lost per file (lower left: smaller and faster; darker: more signal lost)",
                 fontsize=9)
    ax.margins(0.25)
    figure.colorbar(scatter, ax=ax).set_label("max err/spread over the matrix", fontsize=8)
    return _svg(figure, "size-speed")


@_kept
def task_checks(found: list[ArtifactFacts]) -> str | None:
    """Per real table: each artifact's score beside upstream's and chance's, and the signal it loses."""
    with_tasks = [a for a in found if a.verification.get("tasks")]
    if not with_tasks:
        return None
    tables = list(dict.fromkeys(t["name"] for a in with_tasks for t in a.verification["tasks"]))
    figure = Figure(figsize=(max(6.4, 1.6 * len(tables) + 2), 5.2), layout="constrained")
    scores_ax, lost_ax = figure.subplots(2, 1)
    series: list[tuple[str, list[float]]] = []
    first = {t["name"]: t for t in with_tasks[0].verification["tasks"]}
    metric = {name: next(iter(t.get("scores") or {}), None) for name, t in first.items()}

    def score(task: dict[str, Any] | None, which: str) -> float:
        value = (task or {}).get(which, {}).get(metric.get((task or {}).get("name")))
        return math.nan if value is None else float(value)

    series.append(("upstream", [score(first.get(t), "upstream_scores") for t in tables]))
    for a in with_tasks:
        by_name = {t["name"]: t for t in a.verification["tasks"]}
        series.append((a.name, [score(by_name.get(t), "scores") for t in tables]))
    series.append(("chance", [score(first.get(t), "chance_scores") for t in tables]))
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series):
        scores_ax.bar([i + k * width for i in range(len(tables))], values, width, label=label,
                      hatch="//" if label == "chance" else None)
    scores_ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tables))],
                         [f"{t}\n({metric.get(t)})" for t in tables], fontsize=7)
    scores_ax.set_title("Task score per table: each file next to upstream (same weights) and chance", fontsize=9)
    scores_ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    width = 0.8 / len(with_tasks)
    for k, a in enumerate(with_tasks):
        by_name = {t["name"]: t for t in a.verification["tasks"]}
        lost_ax.bar([i + k * width for i in range(len(tables))],
                    [by_name.get(t, {}).get("err_over_spread") or 0.0 for t in tables], width, label=a.name)
    lost_ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tables))], tables, fontsize=7)
    lost_ax.set_yscale("symlog", linthresh=1e-4)
    lost_ax.set_ylabel("err/spread")
    lost_ax.set_title("Signal lost on each table (error over the reference's spread; 0 = upstream's output)", fontsize=9)
    lost_ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _svg(figure, "tasks")


@_kept
def metric_changes(diff: dict[str, Any]) -> str | None:
    """Since the previous release: each shared metric's value before and after, per artifact."""
    shown = [m for m in diff["metrics"] if m["metric"] in ("max err/spread", "max abs err", "size")]
    if not shown:
        return None
    metrics = list(dict.fromkeys(m["metric"] for m in shown))
    figure = Figure(figsize=(3.2 * len(metrics), 3.2), layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        rows = [m for m in shown if m["metric"] == metric]
        positions = range(len(rows))
        ax.barh([p + 0.2 for p in positions], [m["from"] for m in rows], 0.4, label=f"release {diff['from']['manifest_version']}")
        ax.barh([p - 0.2 for p in positions], [m["to"] for m in rows], 0.4, label=f"release {diff['to']['manifest_version']}")
        ax.set_yticks(list(positions), [m["artifact"] for m in rows], fontsize=7)
        ax.set_title(metric, fontsize=9)
        if metric != "size" and all(m["from"] > 0 and m["to"] > 0 for m in rows):
            ax.set_xscale("log")
        ax.legend(fontsize=6)
    figure.suptitle("What changed since the previous release", fontsize=9)
    return _svg(figure, "changes")
