"""The reports' charts, drawn with matplotlib and inlined as SVG: threshold curves (`dst eval`), bars with their
seed spread and learning curves (`dst experiment`).

Each chart is one `<svg class="chart">` string that needs nothing outside the page: glyphs are paths
(`svg.fonttype = "path"`), the XML header, metadata and namespace URLs are dropped, and every id is prefixed with
the chart's own id so several charts (and the timelines) share one HTML document. The output is byte-for-byte
deterministic: a fixed `svg.hashsalt`, no date. Hover text goes in as `<title>` on the groups of artists given a
gid; tests find series by those ids and titles, not by coordinates.

matplotlib is imported on the first chart: commands that draw nothing don't pay its import time. Figures are
built with `matplotlib.figure.Figure` and never through pyplot, so no GUI backend is chosen and nothing global
keeps a figure alive.
"""

from __future__ import annotations

import io
import math
import re
from html import escape
from typing import NamedTuple

BLUE, RED, GREEN, GREY, INK = "#1864ab", "#e03131", "#2f9e44", "#868e96", "#212529"
# One colour per cell in the learning curves, the same in each panel (matplotlib's tab10, a colour-blind-aware set).
SERIES = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
STYLE = {
    "svg.fonttype": "path",
    "svg.hashsalt": "dst-report",
    "font.family": "DejaVu Sans",  # ships with matplotlib: the same glyphs on every machine
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.titleweight": "bold",
    "axes.edgecolor": "#adb5bd",
    "axes.labelcolor": "#495057",
    "xtick.color": "#495057",
    "ytick.color": "#495057",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,  # grid lines behind the bars
    "grid.color": "#e9ecef",
    "grid.linewidth": 0.6,
    "legend.frameon": False,
}


class Bar(NamedTuple):
    """One row of a bar chart: a cell's mean and sample standard deviation over its seeds' values."""

    name: str
    mean: float
    std: float
    values: tuple[float, ...]
    marked: bool  # the best mean or within the seed spread of it


class Series(NamedTuple):
    """One line of a learning-curve panel: per step the mean and standard deviation over seeds."""

    name: str
    steps: tuple[int, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _chart_id(chart_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", chart_id)


def to_svg(fig, chart_id: str, title: str, tips: dict[str, str] | None = None) -> str:
    """The figure as an inline `<svg>`: no header, unique ids, `title` as its accessible name, and `tips[gid]` as
    hover text of the artists saved with that gid."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context(STYLE):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    # The <style> sets matplotlib's default joins for every element of the page; as attributes of the root they
    # are inherited by this chart alone.
    text = re.sub(r"\s*<defs>\s*<style[^>]*>.*?</style>\s*</defs>", "", text, count=1, flags=re.S)
    text = re.sub(r' xmlns(:xlink)?="[^"]*"', "", text)
    prefix = _chart_id(chart_id)
    text = re.sub(r'(id="|xlink:href="#|url\(#)([^")]+)', lambda m: f"{m[1]}{prefix}-{m[2]}", text)
    for gid, tip in (tips or {}).items():
        text = text.replace(f'<g id="{prefix}-{gid}">', f'<g id="{prefix}-{gid}"><title>{escape(tip)}</title>', 1)
    end = text.index(">")
    head = text[:end].replace(
        "<svg", f'<svg class="chart" id="{prefix}" role="img" stroke-linejoin="round" stroke-linecap="butt"', 1
    )
    return f"{head}><title>{escape(title)}</title>{text[end + 1 :]}"


def _nan(values) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def threshold_curve(thresholds: list, f1: list, best, title: str, chart_id: str) -> str:
    """F1 against the decision threshold, the chosen threshold as a dashed red line; a missing F1 breaks the line.
    Gids: `f1` (the curve), `best` (the chosen threshold)."""
    from matplotlib import rc_context

    with rc_context(STYLE):
        fig = _figure(3.0, 2.1)
        ax = fig.add_subplot()
        pairs = list(zip(thresholds, f1, strict=False))  # an F1 list cut short draws the points it has
        xs, ys = _nan(t for t, _ in pairs), _nan(v for _, v in pairs)
        ax.plot(xs, ys, color=BLUE, lw=1.4, marker="o", ms=2.2, gid="f1")
        ax.set(title=title, xlabel="threshold", ylabel="F1", ylim=(0, 1.02))
        tips = {"f1": f"{title}: F1 at {len(xs)} thresholds, {min(xs):.3g} to {max(xs):.3g}" if xs else title}
        label = None
        if best is not None:
            near = min(range(len(xs)), key=lambda i: abs(xs[i] - float(best))) if xs else None
            label = f"best {float(best):.3g}"
            if near is not None and not math.isnan(ys[near]):
                label += f", F1 {ys[near]:.3f}"
            ax.axvline(float(best), color=RED, lw=1.1, ls=(0, (4, 3)), gid="best")
            ax.annotate(
                label,
                (float(best), 1.0),
                xytext=(3, -2),
                textcoords="offset points",
                color=RED,
                va="top",
                ha="left" if not xs or float(best) <= (min(xs) + max(xs)) / 2 else "right",
            )
            tips["best"] = label
        return to_svg(fig, chart_id, f"{title}: {label}" if label else title, tips)


def seed_bars(title: str, bars: list[Bar], chart_id: str, lower_is_better: bool = False) -> str:
    """One horizontal bar per cell: bar = mean, whisker = ± one standard deviation, circles = single seeds, green =
    marked. Gids: `bar{i}` and `seeds{i}` for the i-th bar, top to bottom."""
    from matplotlib import rc_context

    with rc_context(STYLE):
        fig = _figure(8.4, 0.5 + 0.27 * len(bars))
        ax = fig.add_subplot()
        ax.grid(axis="y", visible=False)
        ys = list(range(len(bars)))
        tips = {}
        for y, b in zip(ys, bars, strict=True):
            ax.barh(y, max(0.0, b.mean), height=0.62, color=GREEN if b.marked else GREY, gid=f"bar{y}")
            spread = f" ± {b.std:.4f}" if len(b.values) > 1 else ""
            tips[f"bar{y}"] = f"{b.name}: {b.mean:.4f}{spread} ({len(b.values)} value{'s' * (len(b.values) != 1)})"
            if len(b.values) > 1:
                ax.errorbar(b.mean, y, xerr=b.std, color=INK, lw=1.1, capsize=3.5, capthick=1.1)
                ax.scatter(
                    b.values,
                    [y] * len(b.values),
                    s=14,
                    facecolor="white",
                    edgecolor=INK,
                    lw=0.8,
                    zorder=3,
                    gid=f"seeds{y}",
                )
                tips[f"seeds{y}"] = f"{b.name}, single seeds: " + ", ".join(f"{v:.4f}" for v in b.values)
            ax.annotate(
                f"{b.mean:.3f}{f' ± {b.std:.3f}' if len(b.values) > 1 else ''}",
                (1, y),
                xycoords=("axes fraction", "data"),
                xytext=(6, 0),
                textcoords="offset points",
                va="center",
            )
        ax.set_yticks(ys, [b.name for b in bars])
        ax.invert_yaxis()
        top = max([b.mean + b.std for b in bars] + [v for b in bars for v in b.values]) or 1.0  # all zero
        ax.set_xlim(0, top * 1.05)
        ax.set_xlabel("lower is better" if lower_is_better else "higher is better")
        return to_svg(fig, chart_id, title, tips)


def learning_curves(panels: list[tuple[str, list[Series]]], names: list[str], chart_id: str) -> str:
    """One panel per metric against the training step: per cell the mean over seeds, shaded ± one standard
    deviation. `names` fixes each cell's colour across panels. Gids: `p{panel}-s{cell index in names}`."""
    from matplotlib import rc_context

    colour = {n: SERIES[i % len(SERIES)] for i, n in enumerate(names)}
    with rc_context(STYLE):
        fig = _figure(7.2, 2.9)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        tips, handles = {}, {}
        for p, (ax, (metric, series)) in enumerate(zip(axes, panels, strict=True)):
            for s in series:
                gid = f"p{p}-s{names.index(s.name)}"
                lo = [m - d for m, d in zip(s.means, s.stds, strict=True)]
                hi = [m + d for m, d in zip(s.means, s.stds, strict=True)]
                ax.fill_between(s.steps, lo, hi, color=colour[s.name], alpha=0.15, lw=0)
                (line,) = ax.plot(s.steps, s.means, color=colour[s.name], lw=1.4, marker="o", ms=2.5, gid=gid)
                handles.setdefault(s.name, line)
                tips[gid] = f"{s.name} · {metric}: " + ", ".join(
                    f"step {st} {m:.3f}" for st, m in zip(s.steps, s.means, strict=True)
                )
            ax.set(title=metric, xlabel="training step")
            if not series:
                ax.text(0.5, 0.5, "n/a for every cell", transform=ax.transAxes, ha="center", color=GREY)
        ncols = min(len(handles), 4 if max(map(len, handles), default=0) <= 24 else 2)
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=ncols)
        return to_svg(fig, chart_id, "learning curves: " + ", ".join(m for m, _ in panels), tips)
