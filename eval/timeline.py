"""The per-dialogue timeline of the eval report, drawn by hand as inline SVG because it is the page's
interactive part: every mark carries `<title>` hover text (the spoken text, the match class, the update) and links
to its row in the table below, and the labels stay put while a long video scrolls sideways (no JS, no external
resources). State strips are one rect per constant run and probability sparklines are bucketed to the pixel width,
so a video of thousands of frames still gives a small page. The report's charts are in eval/charts.py.
"""

from __future__ import annotations

import math

from eval.report_text import delta_text, esc, node_key

STATE_COLOURS = {"not_started": "#cfd4da", "in_progress": "#f2a900", "completed": "#2f9e44"}
# Match classes of the speaking matcher; shapes differ as well as colours so the lanes read in greyscale too.
MATCH_STYLES = {
    "matched": ("#2f9e44", "circle"),
    "mismatched": ("#e8590c", "diamond"),
    "redundant": ("#7048e8", "triangle"),
    "missed": ("#e03131", "ring"),
    None: ("#495057", "circle"),
}
UPDATE_COLOURS = {"ref": "#1864ab", "pred": "#0c8599"}
RESEED_COLOUR = "#ae3ec9"
LABEL_W = 84
PAD = 6


def runs(values: list) -> list[tuple[int, int, object]]:
    """(start, end exclusive, value) for each stretch of equal values."""
    out, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            out.append((start, i, values[start]))
            start = i
    return out


def _mark(x: float, y: float, kind, title: str, href: str | None = None) -> str:
    colour, shape = MATCH_STYLES.get(kind, MATCH_STYLES[None])
    cls = f'class="mk k-{kind}" ' if kind else 'class="mk" '
    if shape == "circle":
        el = f'<circle {cls}cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"><title>{esc(title)}</title></circle>'
    elif shape == "ring":
        el = (
            f'<circle {cls}cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="#fff" stroke="{colour}" stroke-width="2">'
            f"<title>{esc(title)}</title></circle>"
        )
    else:
        d = (
            f"M{x:.1f} {y - 5:.1f}L{x + 5:.1f} {y:.1f}L{x:.1f} {y + 5:.1f}L{x - 5:.1f} {y:.1f}Z"
            if shape == "diamond"
            else f"M{x:.1f} {y - 5:.1f}L{x + 5:.1f} {y + 4:.1f}L{x - 5:.1f} {y + 4:.1f}Z"
        )
        el = f'<path {cls}d="{d}" fill="{colour}"><title>{esc(title)}</title></path>'
    return f'<a href="#{href}">{el}</a>' if href else el


def legend_html() -> str:
    """Colour/shape key for the timelines, as small inline SVGs."""
    items = [f'<svg width="14" height="12">{_mark(7, 6, k, k)}</svg>{k}' for k in MATCH_STYLES if k]
    items.append(f'<svg width="14" height="12">{_mark(7, 6, None, "no match class")}</svg>speech (no match info)')
    items += [
        f'<svg width="14" height="12"><rect x="1" y="2" width="12" height="8" fill="{c}"/></svg>{esc(s)}'
        for s, c in STATE_COLOURS.items()
    ]
    items += [
        f'<svg width="14" height="12"><rect x="5" y="0" width="3" height="12" fill="{c}"/></svg>{w} update'
        for w, c in (("reference", UPDATE_COLOURS["ref"]), ("predicted", UPDATE_COLOURS["pred"]))
    ]
    items.append(
        '<svg width="14" height="12"><rect x="1" y="3" width="12" height="6" fill="#e03131"/></svg>'
        "predicted state differs from reference"
    )
    items.append(
        f'<svg width="14" height="12"><path d="M2 1L12 1L7 9Z" fill="{RESEED_COLOUR}"/></svg>'
        "re-seed of the context (hover: strategy, summary)"
    )
    return '<div class="legend">' + "".join(f"<span>{i}</span>" for i in items) + "</div>"


def _nice_step(span: float, max_ticks: float) -> float:
    for step in (0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600):
        if span / step <= max_ticks:
            return step
    return 7200.0


def _clock(t: float, minutes: bool) -> str:
    if not minutes:
        return f"{t:g}"
    m, s = divmod(int(round(t)), 60)
    return f"{m}:{s:02d}"


def _layout(nodes: list[str], has_pu: bool, has_ps: bool, has_err: bool, has_reseed: bool = False) -> tuple[list, int]:
    rows, y = [], PAD

    def add(key, label, h, gap=3):
        nonlocal y
        rows.append((key, label, y, h))
        y += h + gap

    if has_reseed:
        add("reseed", "re-seed", 10)
    add("user", "user", 12)
    add("ref_say", "ref speech", 14, 8)  # the gap holds the match connectors
    add("pred_say", "pred speech", 14)
    if has_ps:
        add("p_speak", "p_speak", 22)
    y += 6
    add("ref_upd", "ref update", 12)
    add("pred_upd", "pred update", 12)
    if has_pu:
        add("p_update", "p_update", 22)
    y += 6
    for n in nodes:
        add(("ref", n), f"{n} ref", 8, 1)
        add(("pred", n), f"{n} pred", 8, 5)
    if has_err:
        add("err", "state error", 6)
    return rows, y + 24


def timeline_svg(d: dict, idx: int, matches: list | None, thetas: dict) -> tuple[str, str]:
    """(labels SVG, timeline SVG) for one dialogue; the labels stay put while the timeline scrolls sideways.

    `matches` hold absolute frame indices, like the dialogue's `frame` fields."""
    frames = d.get("frames") or []
    n, fps = len(frames), float(d.get("fps") or 2.0)
    if not n:
        return "", '<svg class="timeline" width="300" height="24"><text x="4" y="16">no frames</text></svg>'
    f0 = frames[0]["frame"]
    t0 = frames[0].get("time")
    t0 = f0 / fps if t0 is None else float(t0)
    dur = n / fps
    width = int(min(4000, max(760, n * 4)))
    scale = width / dur

    def x(i: float) -> float:
        return PAD + i / fps * scale

    def t(i: int) -> float:
        return t0 + i / fps

    ref_states = [f.get("ref_state") or {} for f in frames]
    pred_states = [f.get("pred_state") for f in frames]
    has_pred_state = any(s is not None for s in pred_states)
    pred_states = [s or {} for s in pred_states]
    nodes = sorted({k for s in ref_states + pred_states for k in s}, key=node_key)
    pu = [f.get("p_update") for f in frames]
    ps = [f.get("p_speak") for f in frames]
    has_pu, has_ps = any(p is not None for p in pu), any(p is not None for p in ps)
    frame_idx = {f["frame"]: i for i, f in enumerate(frames)}
    reseeds = [
        (frame_idx[r["frame"]], r)
        for r in d.get("reseeds") or []
        if isinstance(r, dict) and r.get("frame") in frame_idx
    ]
    rows, height = _layout(nodes, has_pu, has_ps, has_pred_state, bool(reseeds))
    at = {key: (y, h) for key, _, y, h in rows}
    total_w = width + 2 * PAD
    out = [f'<svg class="timeline" width="{total_w}" height="{height}" viewBox="0 0 {total_w} {height}">']

    # Time axis and faint grid lines over every lane.
    minutes = t(n) >= 60
    step = _nice_step(dur, width / 70)
    axis_y = height - 20
    tick = math.ceil(t0 / step) * step
    while tick <= t(n) + 1e-9:
        xt = x((tick - t0) * fps)
        out.append(
            f'<line x1="{xt:.1f}" y1="{PAD}" x2="{xt:.1f}" y2="{axis_y + 4}" class="grid"/>'
            f'<text x="{xt:.1f}" y="{axis_y + 15}" class="tick">{_clock(tick, minutes)}</text>'
        )
        tick += step
    out.append(f'<line x1="{PAD}" y1="{axis_y}" x2="{PAD + width}" y2="{axis_y}" class="axis"/>')

    by_pred, by_ref = match_index(matches)

    def anchor(i: int) -> str:  # the table rows carry the same ids
        return f"d{idx}-f{frames[i]['frame']}"

    # Match connectors first, so the marks draw over them.
    (ry, rh), (py, ph) = at["ref_say"], at["pred_say"]
    for m in matches or []:
        i, j = frame_idx.get(m.get("pred_frame")), frame_idx.get(m.get("ref_frame"))
        if m.get("kind") in ("matched", "mismatched") and i is not None and j is not None:
            out.append(
                f'<line x1="{x(j + 0.5):.1f}" y1="{ry + rh / 2}" x2="{x(i + 0.5):.1f}" y2="{py + ph / 2}" '
                f'stroke="{MATCH_STYLES[m["kind"]][0]}" class="conn"/>'
            )

    for i, f in enumerate(frames):
        xc = x(i + 0.5)
        if f.get("user_text"):
            y, h = at["user"]
            out.append(
                f'<a href="#{anchor(i)}"><rect x="{xc - 3:.1f}" y="{y + 2}" width="6" height="{h - 4}" '
                f'fill="#868e96"><title>{esc(f"{t(i):.1f} s user: " + f["user_text"])}</title></rect></a>'
            )
        for who, label, matched in (("ref", "reference", by_ref), ("pred", "predicted", by_pred)):
            if f.get(f"{who}_text"):
                m = matched.get(f["frame"])
                y, h = at[f"{who}_say"]
                out.append(
                    _mark(
                        xc,
                        y + h / 2,
                        m.get("kind") if m else None,
                        f"{t(i):.1f} s {label}{_kind_note(m, fps)}: {f[f'{who}_text']}",
                        anchor(i),
                    )
                )
        for who in ("ref", "pred"):
            delta = f.get(f"{who}_dst_delta")
            if delta:
                y, h = at[f"{who}_upd"]
                text = (f.get("pred_dst_text") if who == "pred" else None) or delta_text(delta)
                out.append(
                    f'<a href="#{anchor(i)}"><rect class="upd" x="{x(i):.1f}" y="{y}" '
                    f'width="{max(2.0, scale / fps):.1f}" height="{h}" fill="{UPDATE_COLOURS[who]}">'
                    f"<title>{esc(f'{t(i):.1f} s {who} update: {text}')}</title></rect></a>"
                )

    for key, probs in (("p_speak", ps), ("p_update", pu)):
        if key in at:
            out.append(_sparkline(probs, at[key], x, width, thetas.get(key.removeprefix("p_"))))

    for node in nodes:
        for who, states in (("ref", ref_states), ("pred", pred_states)):
            if who == "pred" and not has_pred_state:
                continue
            y, h = at[(who, node)]
            for a, b, v in runs([s.get(node) for s in states]):
                if v is not None:
                    out.append(
                        f'<rect class="st" x="{x(a):.1f}" y="{y}" width="{x(b) - x(a):.2f}" height="{h}" '
                        f'fill="{STATE_COLOURS.get(v, "#fff")}"><title>{esc(node)} {who}: {esc(v)}, '
                        f"{t(a):.1f}-{t(b):.1f} s</title></rect>"
                    )
    if "err" in at:
        y, h = at["err"]
        diff = [
            tuple(sorted((k for k in set(r) | set(p) if r.get(k) != p.get(k)), key=node_key))
            for r, p in zip(ref_states, pred_states, strict=True)
        ]
        for a, b, v in runs(diff):
            if v:
                out.append(
                    f'<rect class="err" x="{x(a):.1f}" y="{y}" width="{x(b) - x(a):.2f}" height="{h}" '
                    f'fill="#e03131"><title>{t(a):.1f}-{t(b):.1f} s predicted state differs on '
                    f"{esc(', '.join(v))}</title></rect>"
                )
    for i, r in reseeds:
        out.append(_reseed_mark(x(i), at["reseed"], axis_y, fps, r))
    out.append("</svg>")

    labels = [f'<svg class="labels" width="{LABEL_W}" height="{height}">']
    labels += [
        f'<text x="{LABEL_W - 4}" y="{y + h / 2 + 3.5}" text-anchor="end">{esc(label)}</text>'
        for _, label, y, h in rows
    ]
    labels.append(
        f'<text x="{LABEL_W - 4}" y="{axis_y + 15}" text-anchor="end">'
        f"{'time (m:ss)' if minutes else 'time (s)'}</text></svg>"
    )
    return "".join(labels), "".join(out)


def _reseed_mark(xr: float, slot: tuple[int, int], axis_y: float, fps: float, reseed: dict) -> str:
    """A re-seed of the context before frame `frame` is fed: a dashed line over every lane and a marker whose hover
    text gives the strategy and, for the summary variant, the generated summary and the reference progress."""
    y, h = slot
    title = (
        f"re-seed before frame {reseed['frame']} ({reseed['frame'] / fps:.1f} s): "
        f"{reseed.get('strategy') or 'unknown strategy'}"
    )
    if reseed.get("summary") is not None:
        title += f"\nsummary: {reseed['summary']}"
    if reseed.get("ref_progress"):
        title += f"\nreference progress: {reseed['ref_progress']}"
    return (
        f'<g class="reseed"><line x1="{xr:.1f}" y1="{y}" x2="{xr:.1f}" y2="{axis_y}" stroke="{RESEED_COLOUR}" '
        f'stroke-dasharray="2 2"/><path d="M{xr - 5:.1f} {y}L{xr + 5:.1f} {y}L{xr:.1f} {y + h}Z" '
        f'fill="{RESEED_COLOUR}"><title>{esc(title)}</title></path></g>'
    )


def match_index(matches: list | None) -> tuple[dict, dict]:
    """Matcher entries by predicted frame and by reference frame (a redundant entry names a silent reference)."""
    by_pred = {m["pred_frame"]: m for m in matches or [] if m.get("pred_frame") is not None}
    by_ref = {m["ref_frame"]: m for m in matches or [] if m.get("kind") != "redundant" and "ref_frame" in m}
    return by_pred, by_ref


def _kind_note(m: dict | None, fps: float) -> str:
    if not m:
        return ""
    parts = [m.get("kind", "")]
    if m.get("cos") is not None:
        parts.append(f"cos {m['cos']:.2f}")
    if m.get("kind") in ("matched", "mismatched"):
        parts.append(f"offset {(m['ref_frame'] - m['pred_frame']) / fps:+.1f} s")
    return " [" + ", ".join(parts) + "]"


def _segments(points: list) -> list[list[str]]:
    """Split a point list at its None entries (missing values break the line)."""
    segs, cur = [], []
    for p in points + [None]:
        if p is None:
            if cur:
                segs.append(cur)
            cur = []
        else:
            cur.append(p)
    return segs


def _sparkline(probs: list, slot: tuple[int, int], x, width: int, theta) -> str:
    """Max per bucket of ~3 px: peaks (threshold crossings) survive; null frames break the line."""
    y0, h = slot
    n = len(probs)
    nb = max(1, min(n, width // 3))
    points = []
    for b in range(nb):
        vals = [p for p in probs[b * n // nb : (b + 1) * n // nb] if p is not None]
        points.append(f"{x((b + 0.5) * n / nb):.1f},{y0 + h - max(vals) * h:.1f}" if vals else None)
    segs = _segments(points)
    out = [f'<g class="spark"><rect x="{x(0):.1f}" y="{y0}" width="{width}" height="{h}" fill="#f1f3f5"/>']
    if theta is not None:
        yt = y0 + h - float(theta) * h
        out.append(
            f'<line x1="{x(0):.1f}" y1="{yt:.1f}" x2="{x(0) + width:.1f}" y2="{yt:.1f}" class="theta">'
            f"<title>threshold {float(theta):.2f}</title></line>"
        )
    out += [f'<polyline points="{" ".join(s)}" class="sparkline"/>' for s in segs]
    return "".join(out) + "</g>"
