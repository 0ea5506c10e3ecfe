"""The outputs of `dst experiment` built from its results lines: results.jsonl, summary.md and report.html.

Per cell and column: the mean and the sample standard deviation (n - 1) over seeds. The best mean of a column is
marked, together with every cell whose mean lies within the larger of the two standard deviations of it: a
difference inside the seed spread is not a win, so a column with one mark has a winner and a column with several
has none. A DST metric of a variant that tracks no DST (`summary`, `none`) is shown as n/a: its predicted state
never moves, so the number would be the never-update baseline's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path

from core.files import write_atomic
from eval.charts import Bar, Series, learning_curves, seed_bars
from experiments.compare import compare
from train.variants import get_variant

STREAM_COLUMN = ("re-seeds per dialogue (test)", "test.reseeds_per_dialogue")


@dataclass(frozen=True)
class Stat:
    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n

    @property
    def std(self) -> float:
        """Sample standard deviation (n - 1); 0 for a single value."""
        if self.n < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))


def flatten(tree, prefix: str = "") -> dict:
    """Nested dicts -> {"a.b.c": leaf}; lists and other leaves are kept as they are."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _is_model(line: dict) -> bool:
    return line.get("seed") is not None


def _applies(line: dict, key: str) -> bool:
    """DST metrics of a variant without a DST are not its own."""
    variant = line.get("config", {}).get("train", {}).get("variant")
    return not (".dst." in f".{key}" and variant is not None and not get_variant(variant).tracks_state)


def _value(line: dict, key: str):
    value = line.get("metrics", {}).get(key, line.get("stream", {}).get(key))
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def resolve_key(keys: tuple[str, ...], lines: list[dict]) -> str | None:
    """The first alternative that some model line holds (e.g. speak_proassist, else speak)."""
    model_lines = [ln for ln in lines if _is_model(ln)] or lines
    return next((k for k in keys if any(_value(ln, k) is not None for ln in model_lines)), None)


def cells_in_order(lines: list[dict]) -> list[str]:
    return list(dict.fromkeys(ln["cell"] for ln in lines))


def stats(lines: list[dict], key: str) -> dict[str, Stat | None]:
    """Per cell: the values of `key` over its seeds (None where the metric does not apply or is missing)."""
    out: dict[str, Stat | None] = {}
    for cell in cells_in_order(lines):
        mine = [ln for ln in lines if ln["cell"] == cell]
        values = [_value(ln, key) for ln in mine if _applies(ln, key)]
        out[cell] = Stat(tuple(values)) if values and all(v is not None for v in values) else None
    return out


def marked(cell_stats: dict[str, Stat | None], candidates: list[str], lower_is_better: bool = False) -> set[str]:
    """The best cell among `candidates` and every cell within the seed spread of it."""
    present = [c for c in candidates if cell_stats.get(c) is not None]
    if not present:
        return set()
    sign = -1.0 if lower_is_better else 1.0
    best = max(present, key=lambda c: sign * cell_stats[c].mean)
    b = cell_stats[best]
    return {c for c in present if abs(cell_stats[c].mean - b.mean) <= max(b.std, cell_stats[c].std)}


def fmt(stat: Stat | None, digits: int = 3) -> str:
    if stat is None:
        return "n/a"
    return f"{stat.mean:.{digits}f}" + (f" ± {stat.std:.{digits}f}" if stat.n > 1 else "")


def table_rows(cfg, lines: list[dict]) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """(header, rows of text, which cells are marked), the columns of the config plus timings."""
    cells = cells_in_order(lines)
    models = [c for c in cells if any(_is_model(ln) for ln in lines if ln["cell"] == c)]
    header = ["cell", "seeds"]
    columns = []
    for col in cfg.columns:
        key = resolve_key(col.keys, lines)
        header.append(f"{col.name} (`{key}`)" if key else f"{col.name} (missing)")
        columns.append((key, col.lower_is_better))
    rows, marks = [], []
    per_column = [
        (stats(lines, key) if key else {}, marked(stats(lines, key), models, low) if key else set())
        for key, low in columns
    ]
    reseeds = stats(lines, STREAM_COLUMN[1])
    train = {
        c: Stat(tuple(ln["timings"]["train_s"] / 60 for ln in lines if ln["cell"] == c and _is_model(ln)))
        for c in models
    }
    header += [STREAM_COLUMN[0], "train min"]
    for cell in cells:
        n = sum(1 for ln in lines if ln["cell"] == cell and _is_model(ln))
        row = [cell, str(n) if n else "-"]
        row_marks = [False, False]
        for cell_stats, best in per_column:
            row.append(fmt(cell_stats.get(cell)))
            row_marks.append(cell in best)
        row += [fmt(reseeds.get(cell), 2), fmt(train.get(cell), 1)]
        row_marks += [False, False]
        rows.append(row)
        marks.append(row_marks)
    return header, rows, marks


def comparison_rows(cfg, lines: list[dict]) -> list[list[str]]:
    """Per [[compare]] pair and measure: a - b, its 95% interval, the dialogues and pairs, and the verdict."""
    rows = []
    for a, b in cfg.comparisons:
        for measure, interval in compare(lines, a, b).items():
            if interval is None:
                rows.append([f"{a} - {b}", measure, "n/a", "n/a", "0", "no pairs"])
                continue
            verdict = ("a wins" if interval.low > 0 else "b wins") if interval.win else "no win (0 inside)"
            rows.append(
                [
                    f"{a} - {b}",
                    measure,
                    f"{interval.mean:+.3f}",
                    f"[{interval.low:+.3f}, {interval.high:+.3f}]",
                    f"{interval.n_dialogues} / {interval.n_pairs}",
                    verdict,
                ]
            )
    return rows


COMPARISON_HEADER = ["cells (a - b)", "turns", "mean difference", "95% interval", "dialogues / pairs", "verdict"]


def curve_stats(lines: list[dict]) -> dict[str, list[tuple[int, Stat | None, Stat]]]:
    """Per cell with learning curves: per kept checkpoint (step), val DST joint accuracy (None where no seed has
    it) and speaking F1 (model mode, thresholds 0.5) over seeds."""
    out = {}
    for cell in cells_in_order(lines):
        curves = [ln.get("curve") or [] for ln in lines if ln["cell"] == cell and _is_model(ln)]
        points = []
        for step in sorted({p["step"] for c in curves for p in c}):
            at = [p for c in curves for p in c if p["step"] == step]
            joint = [p["joint_accuracy"] for p in at if p["joint_accuracy"] is not None]
            points.append((step, Stat(tuple(joint)) if joint else None, Stat(tuple(p["speak_f1"] for p in at))))
        if points:
            out[cell] = points
    return out


def curve_rows(lines: list[dict]) -> list[list[str]]:
    """The learning curves as table rows: cell, step, mean ± sd of each measure."""
    return [
        [cell, str(step), fmt(joint), fmt(speak)]
        for cell, points in curve_stats(lines).items()
        for step, joint, speak in points
    ]


CURVE_HEADER = ["cell", "step", "val DST joint accuracy", "val speaking F1"]


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def summary_markdown(cfg, lines: list[dict]) -> str:
    header, rows, marks = table_rows(cfg, lines)
    data = cfg.data
    out = [f"# Experiment `{cfg.name}`", ""]
    if cfg.description:
        out += [cfg.description, ""]
    seeds = ", ".join(map(str, cfg.seeds))
    out += [
        f"Data: the `{data['setting']}` synthetic setting, {data['videos'][0]}/{data['videos'][1]}/"
        f"{data['videos'][2]} train/val/test videos, data seed {data['seed']}, model `{data['model']}`"
        f"{' (--fast)' if cfg.fast else ''}. Training seeds: {seeds}. Thresholds swept on val, applied to test.",
        "",
        "Mean ± sample standard deviation over seeds. **Bold**: the best mean of a column and every cell within "
        "one standard deviation of it (the larger of the two): a difference inside the seed spread is not a "
        "win, so one bold entry in a column is a win, several are a tie. n/a: a DST metric of a variant that "
        "tracks no DST.",
        "",
    ]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "---|" * len(header))
    for row, row_marks in zip(rows, marks, strict=True):
        out.append("| " + " | ".join(f"**{v}**" if m else v for v, m in zip(row, row_marks, strict=True)) + " |")
    n_model = sum(1 for ln in lines if _is_model(ln))
    out += [
        "",
        f"results.jsonl: {n_model} lines, one per cell and seed, and {len(lines) - n_model} baseline "
        f"line(s); each holds every val and test metric of metrics.json by key path.",
    ]
    if cfg.comparisons:
        out += [
            "",
            "## Paired comparisons",
            "",
            "Test speaking F1 (ProAssist's matching) per dialogue, a - b, pooled over dialogues and seeds; 95% "
            "percentile bootstrap interval over dialogues (experiments/compare.py). An interval containing 0 is "
            "not a win.",
            "",
        ]
        out += _markdown_table(COMPARISON_HEADER, comparison_rows(cfg, lines))
    if curve := curve_rows(lines):
        out += [
            "",
            "## Learning curves",
            "",
            "Val, model mode at thresholds 0.5, mean ± sd over seeds, per kept checkpoint.",
            "",
        ]
        out += _markdown_table(CURVE_HEADER, curve)
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------- HTML


def _bars(title: str, key: str, cell_stats: dict[str, Stat | None], best: set[str], low: bool, index: int) -> str:
    """One bar chart (eval/charts.py): bar = mean, whisker = ± std, circles = seeds."""
    bars = [Bar(c, s.mean, s.std, s.values, c in best) for c, s in cell_stats.items() if s is not None]
    if not bars:
        return ""
    note = " (lower is better)" if low else ""
    return f"<h3>{escape(title)}{note}</h3><p class=key><code>{escape(key)}</code></p>" + seed_bars(
        title, bars, f"bars-{index}", low
    )


def _curve_chart(lines: list[dict]) -> str:
    """Val joint accuracy and speaking F1 against the step, one line per cell (mean, shaded ± std)."""
    per_cell = curve_stats(lines)
    if not per_cell:
        return ""

    def series(index: int) -> list[Series]:  # index 1: joint accuracy, 2: speaking F1
        out = []
        for cell, points in per_cell.items():
            kept = [(p[0], p[index]) for p in points if p[index] is not None]
            if kept:
                out.append(
                    Series(
                        cell,
                        tuple(step for step, _ in kept),
                        tuple(v.mean for _, v in kept),
                        tuple(v.std for _, v in kept),
                    )
                )
        return out

    panels = [("val DST joint accuracy", series(1)), ("val speaking F1", series(2))]
    return learning_curves(panels, list(per_cell), "learning-curves")


def report_html(cfg, lines: list[dict]) -> str:
    header, rows, marks = table_rows(cfg, lines)
    models = [c for c in cells_in_order(lines) if any(_is_model(ln) for ln in lines if ln["cell"] == c)]

    def th(h: str) -> str:  # the markdown header's `key` as <code>
        name, _, key = h.partition(" (`")
        return f"<th>{escape(name)}<br><code>{escape(key.rstrip(')`'))}</code></th>" if key else f"<th>{escape(h)}</th>"

    table = ["<table><tr>" + "".join(th(h) for h in header) + "</tr>"]
    for row, row_marks in zip(rows, marks, strict=True):
        table.append(
            "<tr>"
            + "".join(f"<td class={'best' if m else 'v'}>{escape(v)}</td>" for v, m in zip(row, row_marks, strict=True))
            + "</tr>"
        )
    table.append("</table>")
    charts = []
    for i, col in enumerate(cfg.columns):
        key = resolve_key(col.keys, lines)
        if key:
            s = stats(lines, key)
            charts.append(_bars(col.name, key, s, marked(s, models, col.lower_is_better), col.lower_is_better, i))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dst experiment {escape(cfg.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #212529; max-width: 1100px; }}
table {{ border-collapse: collapse; font-size: 13px; margin: 12px 0; }}
th, td {{ border: 1px solid #dee2e6; padding: 4px 8px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
td.best {{ font-weight: 700; background: #ebfbee; }}
p.key {{ margin: 0; font-size: 12px; color: #495057; }}
</style></head><body>
<h1>Experiment <code>{escape(cfg.name)}</code></h1>
<p>{escape(cfg.description)}</p>
<p>Mean ± sample standard deviation over {len(cfg.seeds)} seed(s); green/bold: the best mean and every cell within
one standard deviation of it (a difference inside the seed spread is not a win). Bars: mean; whiskers: ± one
standard deviation; circles: single seeds.</p>
{"".join(table)}
{_html_table("Paired comparisons", COMPARISON_HEADER, comparison_rows(cfg, lines))}
{_html_table("Learning curves (val, model mode, thresholds 0.5)", CURVE_HEADER, curve_rows(lines))}
{_curve_chart(lines)}
{"".join(charts)}
</body></html>
"""


def _html_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<h2>{escape(title)}</h2><table><tr>{head}</tr>{body}</table>"


def write_reports(cfg, out: Path, lines: list[dict]) -> None:
    write_atomic(out / "results.jsonl", "".join(json.dumps(ln) + "\n" for ln in lines))
    write_atomic(out / "summary.md", summary_markdown(cfg, lines))
    write_atomic(out / "report.html", report_html(cfg, lines))
