"""HTML report of `dst eval`: one self-contained page (inline CSS and SVG, two inline button handlers, nothing
loaded from anywhere) with summary cards, threshold curves and, per dialogue, a timeline and a table of what
happened, so a person can read a dialogue next to its scores.

Every text from the data goes through `html.escape`: dialogue texts are model output and may contain markup.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from core.files import write_atomic
from eval.charts import threshold_curve
from eval.columns import block_rows
from eval.intents import INTENTS
from eval.report_text import delta_text, esc
from eval.timeline import MATCH_STYLES, legend_html, match_index, timeline_svg

NA = '<span class="na">not available</span>'
SPEAK_ROWS = tuple((c.key, c.label.removeprefix("speaking ")) for c in block_rows("speak"))
DST_ROWS = tuple((c.key, c.label, *(c.detail or (None, None))) for c in block_rows("dst"))
TEXT_ROWS = tuple((c.key, c.label) for c in block_rows("text"))

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:16px 24px;color:#212529}
h1{font-size:22px;margin:0 0 6px}h2{font-size:18px;margin:22px 0 8px;border-bottom:1px solid #dee2e6}
dl.run{display:grid;grid-template-columns:max-content auto;gap:2px 12px;margin:0;font-size:13px}
dl.run dt{color:#6c757d}dl.run dd{margin:0;font-family:ui-monospace,monospace;word-break:break-all}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:12px}
.card{border:1px solid #dee2e6;border-radius:6px;padding:8px 12px;background:#fff}
.card.mean{border-color:#1864ab;background:#f3f8fd}.card h3{margin:0 0 4px;font-size:16px}
.card .cols{display:flex;gap:14px;flex-wrap:wrap}.card table{border-collapse:collapse;font-size:13px}
.card th{text-align:left;color:#495057;font-weight:600;padding-top:4px}.card td{padding:0 6px 0 0}
.card td.v{text-align:right;font-variant-numeric:tabular-nums;font-weight:600}.card th.v{text-align:right}
.card td.alt{color:#6c757d;font-weight:400}
.counts{font-size:12px;color:#495057;margin-top:4px}.na{color:#adb5bd;font-weight:400;font-style:italic}
.curves{display:flex;flex-wrap:wrap;gap:8px 18px}svg text{font-size:10px;fill:#495057}
details.dlg{border:1px solid #dee2e6;border-radius:6px;margin:8px 0;padding:4px 10px}
details.dlg>summary{cursor:pointer;font-weight:600}.meta{color:#6c757d;font-weight:400}
.tl{display:flex;margin:8px 0}.tl .labels{flex:none}.tl .scroll{overflow-x:auto;min-width:0}.labels text{font-size:10px}
.grid{stroke:#e9ecef}.axis{stroke:#868e96}.tick{text-anchor:middle}.conn{stroke-width:1;opacity:.55}
.sparkline{fill:none;stroke:#343a40;stroke-width:1}.theta{stroke:#e03131;stroke-dasharray:3 2}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px;margin:6px 0}
.legend span{display:inline-flex;align-items:center;gap:4px}
.events{max-height:420px;overflow:auto}.events table{border-collapse:collapse;font-size:12.5px;width:100%}
.events th{position:sticky;top:0;background:#f8f9fa;text-align:left;border-bottom:1px solid #ced4da}
.events td,.events th{padding:2px 6px;vertical-align:top;border-bottom:1px solid #f1f3f5}
.events tr:target{background:#fff3bf}.num{font-variant-numeric:tabular-nums;white-space:nowrap}
.badge{display:inline-block;font-size:10.5px;padding:0 4px;border-radius:3px;color:#fff;margin-right:4px}
.omitted{padding:8px;background:#fff3bf;border-radius:4px}button{font-size:12px;margin-right:6px}
"""


def fmt(v, digits: int = 3) -> str:
    """A metric value for display; null (e.g. METEOR without Java) says so instead of showing 0."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return NA
    if isinstance(v, bool) or isinstance(v, int):
        return esc(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return esc(v)


def _pr_title(block: dict, p_key: str | None, r_key: str | None) -> str:
    if not p_key:
        return ""
    p, r = block.get(p_key), block.get(r_key)
    return f' title="precision {fmt(p) if p is not None else "n/a"}, recall {fmt(r) if r is not None else "n/a"}"'


def _pair_row(label: str, a, b, title: str = "") -> str:
    return f'<tr><td>{label}</td><td class="v"{title}>{fmt(a)}</td><td class="v alt">{fmt(b)}</td></tr>'


def _card(name: str, m: dict, mean: bool = False) -> str:
    speak, text, dst = m.get("speak") or {}, m.get("text") or {}, m.get("dst") or {}
    pro, never = m.get("speak_proassist"), m.get("dst_never")

    def rows(items, block):
        return "".join(f'<tr><td>{lab}</td><td class="v">{fmt(block.get(key))}</td></tr>' for key, lab in items)

    if pro is not None:  # the exact score beside ProAssist's own (the one to quote next to the paper)
        s_tab = (
            '<table><tr><th>Speaking</th><th class="v">exact</th><th class="v" title="ProAssist\'s find_match, '
            'reproduced">ProAssist</th></tr>'
            + "".join(_pair_row(lab, speak.get(key), pro.get(key)) for key, lab in SPEAK_ROWS)
            + "</table>"
        )
    else:
        s_tab = f'<table><tr><th colspan="2">Speaking</th></tr>{rows(SPEAK_ROWS, speak)}</table>'
    if never is not None or "dst_never" in m:  # every DST number beside the never-update predictor's
        never = never or {}
        d_tab = (
            '<table><tr><th>DST</th><th class="v">model</th><th class="v" title="the never-update predictor on '
            'the same references">never</th></tr>'
            + "".join(_pair_row(lab, dst.get(key), never.get(key), _pr_title(dst, p, r)) for key, lab, p, r in DST_ROWS)
            + "</table>"
        )
    else:
        d_tab = (
            '<table><tr><th colspan="2">DST</th></tr>'
            + "".join(
                f'<tr><td>{lab}</td><td class="v"{_pr_title(dst, p, r)}>{fmt(dst.get(key))}</td></tr>'
                for key, lab, p, r in DST_ROWS
            )
            + "</table>"
        )
    t_tab = f'<table><tr><th colspan="2">Text (on matched pairs)</th></tr>{rows(TEXT_ROWS, text)}</table>'
    counts = [
        f"{lab} {fmt(speak.get(key))}"
        for key, lab in (
            ("num_pred", "predicted"),
            ("num_ref", "reference"),
            ("num_matched", "matched"),
            ("num_mismatched", "mismatched"),
            ("num_missed", "missed"),
            ("num_redundant", "redundant"),
            ("jaccard", "Jaccard"),
        )
        if key in speak
    ]
    if "time_diff_s" in speak:
        counts.append(f"mean time offset {fmt(speak['time_diff_s'], 2)} s")
    if pro is not None:
        counts.append(
            f"ProAssist matching: exact copies {fmt(pro.get('exact_copies'))}, zero-cost pairs dropped "
            f"{fmt(pro.get('zero_cost_dropped'))}"
        )
    if m.get("summary_similarity") is not None:
        counts.append(f"summary similarity {fmt(m['summary_similarity'])}")
    if m.get("reseeds") is not None:
        counts.append(f"re-seeds {fmt(m['reseeds'])}")
    return (
        f'<div class="card{" mean" if mean else ""}"><h3>{esc(name)}</h3>'
        f'<div class="cols">{s_tab}{d_tab}{t_tab}</div><div class="counts">{" · ".join(counts)}</div></div>'
    )


def _intent_cell(block: dict | None, intent: str) -> str:
    r = ((block or {}).get("intent_recall") or {}).get(intent)
    if not r:
        return f"<td>{NA}</td>"
    n = r.get("num_ref")
    n = f"{n:g}" if isinstance(n, (int, float)) else "?"
    return f'<td class="num">{fmt(r.get("recall"))} <span class="meta">of {esc(n)}</span></td>'


def _intents(metrics: dict) -> str:
    """Speaking recall per intent of the reference turn (eval/intents.py), per dataset and the mean."""
    scopes = [("mean over datasets", metrics.get("mean") or {})] + sorted((metrics.get("datasets") or {}).items())
    if not any((m.get("speak") or {}).get("intent_recall") for _, m in scopes):
        return ""
    head = "".join(f"<th>{i}</th>" for i in INTENTS)
    body = []
    for name, m in scopes:
        for score, label in (("speak", "exact"), ("speak_proassist", "ProAssist")):
            if m.get(score) is not None:
                body.append(
                    f"<tr><td>{esc(name)}</td><td>{label}</td>"
                    + "".join(_intent_cell(m[score], i) for i in INTENTS)
                    + "</tr>"
                )
    return (
        '<section id="intents"><h2>Speaking recall per intent</h2><p class="meta">Share of reference turns of '
        'each intent that a prediction matched (a turn can count for two intents); "of n" is the number of '
        'reference turns (the mean row averages the datasets that have the intent).</p><div class="events">'
        f"<table><tr><th>scope</th><th>score</th>{head}</tr>{''.join(body)}</table></div></section>"
    )


def _summary(metrics: dict) -> str:
    datasets = metrics.get("datasets") or {}
    cards = [_card("mean over datasets", metrics["mean"], True)] if metrics.get("mean") else []
    cards += [_card(name, m) for name, m in sorted(datasets.items())]
    return f'<section id="summary"><h2>Summary</h2><div class="cards">{"".join(cards)}</div></section>'


def _header(run_info: dict, metrics: dict, title: str) -> str:
    info = dict(run_info or {})
    for key, label in (
        ("protocol", "protocol"),
        ("variant", "variant"),
        ("dst_window_s", "DST window (s, each side)"),
        ("dialogues_without_reference", "dialogues without reference"),
    ):
        if metrics.get(key) is not None:
            info.setdefault(label, metrics[key])
    if isinstance(metrics.get("reseeds"), dict):
        info.setdefault("re-seeds", metrics["reseeds"].get("total"))
    if metrics.get("meteor_failures"):
        info.setdefault("METEOR failures", "; ".join(metrics["meteor_failures"]))
    info.setdefault("sentence embeddings", metrics.get("sts_model"))
    info.setdefault("METEOR", metrics.get("meteor") or "not available")
    items = "".join(
        f"<dt>{esc(k)}</dt><dd>{esc(v if isinstance(v, str) else json.dumps(v, default=str))}</dd>"
        for k, v in info.items()
        if v is not None
    )
    return f'<header><h1>{esc(title)}</h1><dl class="run">{items}</dl></header>'


def _curves(sweep: dict | None) -> str:
    if not sweep or not sweep.get("datasets"):
        return ""
    charts = []
    for name, per in sorted(sweep["datasets"].items()):
        for decision in ("speak", "update"):
            c = (per or {}).get(decision)
            if c and c.get("thresholds"):
                charts.append(
                    threshold_curve(
                        c["thresholds"],
                        c.get("f1") or [],
                        c.get("best"),
                        f"{name} · {decision}",
                        f"sweep-{len(charts)}",
                    )
                )
    return (
        '<section id="thresholds"><h2>Threshold sweep</h2><p class="meta">F1 against the decision threshold; '
        f'the red line is the chosen threshold.</p><div class="curves">{"".join(charts)}</div></section>'
    )


def _thetas(run_info: dict, dataset: str) -> dict:
    """Thresholds for the probability strips. run_info["thresholds"] is {speak, update}, or per dataset (or "all")
    either that or an (update, speak) pair, the form `eval/evaluate.py` writes."""
    th = (run_info or {}).get("thresholds")
    if not isinstance(th, dict):
        return {}
    th = th.get(dataset, th.get("all", th))
    if isinstance(th, (list, tuple)) and len(th) == 2:
        th = {"update": th[0], "speak": th[1]}
    if not isinstance(th, dict):
        return {}
    return {k: th[k] for k in ("speak", "update") if isinstance(th.get(k), (int, float))}


def _matches_for(matches, i: int) -> list | None:
    if matches is None:
        return None
    if isinstance(matches, dict):  # JSON turns integer keys into strings
        return matches.get(i, matches.get(str(i)))
    return matches[i] if i < len(matches) else None


def _badge(m: dict | None) -> str:
    if not m or m.get("kind") not in MATCH_STYLES:
        return ""
    cos = f' title="cos {m["cos"]:.2f}"' if m.get("cos") is not None else ""
    return f'<span class="badge" style="background:{MATCH_STYLES[m["kind"]][0]}"{cos}>{esc(m["kind"])}</span>'


def _events(d: dict, idx: int, matches: list | None, max_rows: int) -> str:
    by_pred, by_ref = match_index(matches)
    keys = ("user_text", "ref_text", "pred_text", "ref_dst_delta", "pred_dst_delta")
    busy = [f for f in d.get("frames") or [] if any(f.get(k) for k in keys)]
    if not busy:
        return '<p class="meta">Nothing happens in this dialogue (no text, no updates).</p>'
    rows = []
    for f in busy[:max_rows]:
        pred_upd = delta_text(f.get("pred_dst_delta"))
        raw = f.get("pred_dst_text")
        if raw and raw != pred_upd:  # show what the model wrote when it differs from the parsed update
            pred_upd = f"{pred_upd} ({raw})" if pred_upd else raw
        probs = " / ".join("-" if f.get(k) is None else f"{f[k]:.2f}" for k in ("p_update", "p_speak"))
        time = f.get("time")
        rows.append(
            f'<tr id="d{idx}-f{esc(f["frame"])}"><td class="num">{"" if time is None else f"{time:.1f}"}</td>'
            f'<td class="num">{esc(f["frame"])}</td><td>{esc(f.get("user_text") or "")}</td>'
            f"<td>{_badge(by_ref.get(f['frame'])) if f.get('ref_text') else ''}{esc(f.get('ref_text') or '')}</td>"
            f"<td>{_badge(by_pred.get(f['frame'])) if f.get('pred_text') else ''}{esc(f.get('pred_text') or '')}"
            f"</td><td>{esc(delta_text(f.get('ref_dst_delta')))}</td><td>{esc(pred_upd)}</td>"
            f'<td class="num">{probs}</td></tr>'
        )
    more = f'<p class="meta">{len(busy) - max_rows} more rows not shown.</p>' if len(busy) > max_rows else ""
    return (
        '<div class="events"><table><tr><th>time (s)</th><th>frame</th><th>user</th><th>reference</th>'
        "<th>prediction</th><th>ref update</th><th>pred update</th><th>p_update / p_speak</th></tr>"
        f"{''.join(rows)}</table></div>{more}"
    )


def _dialogue(d: dict, idx: int, matches: list | None, thetas: dict, is_open: bool, max_rows: int) -> str:
    frames = d.get("frames") or []
    fps = float(d.get("fps") or 2.0)

    def count(key):
        return sum(1 for f in frames if f.get(key))

    meta = [
        f"{len(frames)} frames, {len(frames) / fps:.1f} s",
        f"speech ref/pred {count('ref_text')}/{count('pred_text')}",
        f"updates ref/pred {count('ref_dst_delta')}/{count('pred_dst_delta')}",
    ]
    if matches is not None:
        kinds = [m.get("kind") for m in matches]
        meta.append(", ".join(f"{k} {kinds.count(k)}" for k in ("matched", "mismatched", "missed", "redundant")))
    name = " · ".join(esc(d.get(k)) for k in ("dataset", "video_uid", "user_type") if d.get(k) is not None)
    if d.get("conversation") is not None:
        name += f" · conversation {esc(d['conversation'])}"
    labels, svg = timeline_svg(d, idx, matches, thetas)
    return (
        f'<details class="dlg"{" open" if is_open else ""}><summary>#{idx} {name} '
        f'<span class="meta">({esc("; ".join(meta))})</span></summary>'
        f'<div class="tl">{labels}<div class="scroll">{svg}</div></div>'
        f"{_events(d, idx, matches, max_rows)}</details>"
    )


def judge_section(judge: dict) -> str:
    """The "LLM judge" section from judge.json (`dst judge`, eval/judge.py): its four 1-5 scores per dataset and
    their mean, which judge gave them, and how many samples it skipped."""
    metrics = list(judge["mean"])
    head = "".join(f'<th class="num">{esc(m)}</th>' for m in metrics)
    rows = []
    for name, block in [("mean over datasets", judge["mean"]), *sorted(judge["datasets"].items())]:
        counts = f"{block['dialogues_scored']} of {block['dialogues']}" if "dialogues" in block else ""
        cells = "".join(f'<td class="num">{fmt(block[m], 2)}</td>' for m in metrics)
        rows.append(f'<tr><td>{esc(name)}</td>{cells}<td class="num">{esc(counts)}</td></tr>')
    j, st, s = judge["judge"], judge["settings"], judge["samples"]
    where = f", {j['url']}" if j.get("url") else ""
    caveat = (
        ""
        if judge.get("proassist_settings")
        else " <strong>Not ProAssist's judge and settings: not comparable with the paper.</strong>"
    )
    return (
        f'<section id="judge"><h2>LLM judge</h2><p class="meta">{esc(j["model"])} ({esc(j["backend"])}'
        f"{esc(where)}); n={esc(st['n'])}, temperature {esc(st['temperature'])}, top_p {esc(st['top_p'])}, "
        f"protocol {esc(st['protocol'])}; 1-5 Likert scores, mean over valid samples, then dialogues, then "
        f"datasets. Skipped samples (no score object, or a score missing or outside 1-5): {esc(s['skipped'])} "
        f'of {esc(s["requested"])}.{caveat}</p><div class="events"><table><tr><th>dataset</th>{head}'
        f'<th class="num">dialogues scored</th></tr>{"".join(rows)}</table></div></section>'
    )


JUDGE_SECTION = re.compile(r'<section id="judge">.*?</section>', re.S)


def with_judge(html: str, judge: dict) -> str:
    """A report with judge.json's section: replacing the one it has, else before the threshold curves or the
    dialogues (after the metrics), else at the end of the page."""
    section = judge_section(judge)
    if JUDGE_SECTION.search(html):
        return JUDGE_SECTION.sub(lambda _: section, html, count=1)
    for anchor in ('<section id="thresholds">', '<section id="dialogues">', "</body>"):
        if anchor in html:
            return html.replace(anchor, section + anchor, 1)
    return html + section


def render_report(
    dialogues: list[dict],
    metrics: dict,
    run_info: dict,
    matches=None,
    sweep: dict | None = None,
    *,
    max_dialogues: int = 50,
    open_first: int = 3,
    max_table_rows: int = 500,
    title: str = "dst eval report",
    judge: dict | None = None,
) -> str:
    """The whole report as one HTML document.

    `matches`: per dialogue index (a list aligned with `dialogues`, or a dict keyed by index) the speaking
    matcher's pairs, with absolute frame indices; without it speech marks carry no match class.
    Only the first `max_dialogues` dialogues get a timeline (the page says how many were left out), the first
    `open_first` of them expanded. `judge`: judge.json of these predictions, shown after the metrics."""
    shown = dialogues[:max_dialogues]
    parts = [
        _dialogue(d, i, _matches_for(matches, i), _thetas(run_info, d.get("dataset")), i < open_first, max_table_rows)
        for i, d in enumerate(shown)
    ]
    omitted = len(dialogues) - len(shown)
    if omitted:
        parts.append(
            f'<p class="omitted">{omitted} of {len(dialogues)} dialogues omitted '
            f"(showing the first {len(shown)}; raise max_dialogues to see more).</p>"
        )
    toggles = (
        '<button type="button" onclick="document.querySelectorAll(\'details.dlg\').forEach(function(d)'
        '{d.open=true})">expand all</button><button type="button" onclick="document.querySelectorAll('
        "'details.dlg').forEach(function(d){d.open=false})\">collapse all</button>"
    )
    body = (
        _header(run_info, metrics, title)
        + _summary(metrics)
        + _intents(metrics)
        + (judge_section(judge) if judge else "")
        + _curves(sweep)
        + f'<section id="dialogues"><h2>Dialogues ({len(dialogues)})</h2>'
        '<p class="meta">Hover a mark for its text; click it to jump to its row in the table below the '
        f"timeline. Each node shows the reference state above the predicted one.</p>{legend_html()}"
        f"<p>{toggles}</p>{''.join(parts)}</section>"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
        f"<body>{body}</body></html>\n"
    )


def write_report(
    path: str | Path,
    dialogues: list[dict],
    metrics: dict,
    run_info: dict,
    matches=None,
    sweep: dict | None = None,
    **kwargs,
) -> Path:
    path = Path(path)
    write_atomic(path, render_report(dialogues, metrics, run_info, matches, sweep, **kwargs))
    return path
