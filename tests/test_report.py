"""The eval HTML report: one self-contained, escaped, well-formed page that stays small for long videos."""

from __future__ import annotations

import ast
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from eval.report import render_report, write_report
from eval.timeline import runs

EVIL = "<script>alert(1)</script> & \"quoted\" 'single'"
VOID = {"meta", "br", "hr", "img", "input", "link", "col", "wbr", "area", "base", "source", "track", "embed"}


def frame(k: int, fps: float = 2.0, ref=None, pred=None, **kw) -> dict:
    f = {
        "frame": k,
        "time": (k + 1) / fps,
        "user_text": "",
        "p_update": 0.1,
        "p_speak": 0.2,
        "pred_dst_delta": {},
        "ref_dst_delta": {},
        "pred_state": pred,
        "ref_state": ref,
        "pred_text": "",
        "ref_text": "",
        "pred_dst_text": "",
    }
    f.update(kw)
    return f


def dialogue(uid: str, dataset: str, n: int, k0: int = 10, events: dict | None = None, **kw) -> dict:
    """`n` frames from absolute frame `k0`; S1 goes in_progress at k0+2 and completed at k0+6 (reference),
    the prediction a frame late; `events` adds fields per absolute frame."""
    frames = []
    for k in range(k0, k0 + n):
        ref = {"S1": "not_started" if k < k0 + 2 else "in_progress" if k < k0 + 6 else "completed", "S2": "not_started"}
        pred = {
            "S1": "not_started" if k < k0 + 3 else "in_progress" if k < k0 + 7 else "completed",
            "S2": "not_started",
        }
        f = frame(k, ref=ref, pred=pred)
        f.update((events or {}).get(k, {}))
        frames.append(f)
    return {
        "dataset": dataset,
        "video_uid": uid,
        "conversation": 0,
        "user_type": "talk_some",
        "fps": 2.0,
        "variant": "dst",
        "protocol": "full-video",
        "frames": frames,
        **kw,
    }


def block(f1: float, meteor=0.2) -> dict:
    return {
        "speak": {
            "precision": 0.5,
            "recall": 0.25,
            "f1": f1,
            "num_pred": 4,
            "num_ref": 8,
            "num_matched": 2,
            "num_mismatched": 1,
            "num_missed": 5,
            "num_redundant": 1,
            "jaccard": 0.2,
            "time_diff_s": 0.7,
        },
        "text": {
            "Bleu_1": 0.4,
            "Bleu_2": 0.3,
            "Bleu_3": 0.2,
            "Bleu_4": 0.1234,
            "CIDEr": 1.4321,
            "METEOR": meteor,
            "semantic_score": 0.61,
        },
        "dst": {
            "update_precision": 0.6,
            "update_recall": 0.5,
            "update_f1": 0.5454,
            "node_accuracy": 0.9,
            "joint_accuracy": 0.8,
            "transition_precision": 0.5,
            "transition_recall": 0.5,
            "transition_f1": 0.5,
            "validity": 1.0,
        },
    }


@pytest.fixture
def sample():
    d0 = dialogue(
        "vid-<a>",
        "wtag",
        20,
        events={
            11: {"user_text": EVIL},
            12: {"ref_text": "open the lid", "pred_text": "open the lid now", "ref_dst_delta": {"S1": "in_progress"}},
            13: {"pred_dst_delta": {"S1": "in_progress"}, "pred_dst_text": "S1=in_progress"},
            15: {"ref_text": "turn the screw & hold", "pred_text": "wash the pan"},
            18: {"ref_text": "well done"},
            21: {"pred_text": EVIL},
        },
    )
    d1 = dialogue("vid-b", "ego4d", 12, k0=0, events={3: {"ref_text": "hi"}, 4: {"pred_text": "hello"}})
    d2 = dialogue("vid-c", "ego4d", 8, k0=0)
    matches = [
        [
            {"pred_frame": 12, "ref_frame": 12, "kind": "matched", "cos": 0.91},
            {"pred_frame": 15, "ref_frame": 15, "kind": "mismatched", "cos": 0.2},
            {"pred_frame": 21, "ref_frame": 22, "kind": "redundant", "cos": None},
            {"ref_frame": 18, "kind": "missed"},
        ],
        [{"pred_frame": 4, "ref_frame": 3, "kind": "matched", "cos": 0.7}],
        [],
    ]
    metrics = {
        "sts_model": "all-MiniLM-L6-v2",
        "meteor": "pycocoevalcap METEOR 1.5",
        "datasets": {"wtag": block(0.3642), "ego4d": block(0.2718, meteor=None)},
        "mean": block(0.318),
    }
    sweep = {
        "datasets": {
            name: {
                d: {
                    "thresholds": [0.1 * i for i in range(1, 10)],
                    "f1": [0.1, 0.2, 0.3, 0.35, 0.4, 0.38, 0.3, None, 0.1],
                    "best": 0.5,
                }
                for d in ("speak", "update")
            }
            for name in ("wtag", "ego4d")
        }
    }
    run_info = {
        "checkpoint": "runs/x/ckpt-100",
        "mode": "model",
        "thresholds": {"speak": 0.4, "update": 0.5},
        "context": "dst-summary",
        "date": "2026-01-01",
    }
    return [d0, d1, d2], metrics, run_info, matches, sweep


class TagChecker(HTMLParser):
    """Every non-void element closed, in order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append((tag, list(self.stack[-3:])))
        else:
            self.stack.pop()


def timelines(page: str) -> list[str]:
    return re.findall(r'<svg class="timeline".*?</svg>', page, flags=re.S)


def check_well_formed(page: str) -> TagChecker:
    checker = TagChecker()
    checker.feed(page)
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors[:5], checker.stack[-5:])
    return checker


def test_complete_well_formed_document(sample):
    page = render_report(*sample)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    tags = check_well_formed(page).tags
    assert tags.count("html") == tags.count("head") == tags.count("body") == 1


def test_self_contained(sample):
    page = render_report(*sample)
    assert "http://" not in page and "https://" not in page
    refs = re.findall(r'\b(?:src|href)\s*=\s*["\']?([^"\'\s>]*)', page) + re.findall(r"url\(([^)]*)\)", page)
    assert refs
    for ref in refs:
        assert ref.startswith("#"), ref  # only in-page anchors (marks to rows, chart glyphs and clip paths)
    assert "<link" not in page and "@import" not in page


def test_escapes_dialogue_text(sample):
    page = render_report(*sample)
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&quot;quoted&quot;" in page and "vid-&lt;a&gt;" in page
    assert "<script" not in page  # the page itself needs no script element


def test_summary_cards(sample):
    page = render_report(*sample)
    for text in (
        "0.364",
        "0.272",
        "0.318",
        "0.545",
        "0.123",
        "1.432",
        "runs/x/ckpt-100",
        "dst-summary",
        "pycocoevalcap METEOR 1.5",
        "all-MiniLM-L6-v2",
    ):
        assert text in page, text
    assert len(re.findall(r'class="card( mean)?"', page)) == 3
    assert "not available" in page  # ego4d METEOR is null


def test_one_timeline_per_dialogue_and_match_marks(sample):
    page = render_report(*sample)
    assert page.count('<svg class="timeline"') == page.count('<details class="dlg"') == 3
    assert page.count('<details class="dlg" open>') == 3
    first = timelines(page)[0]
    for kind, count in (("matched", 2), ("mismatched", 2), ("redundant", 1), ("missed", 1)):
        assert first.count(f'class="mk k-{kind}"') == count, kind  # a pair marks both lanes
    assert 'id="d0-f12"' in page and 'href="#d0-f12"' in page  # marks link to their table rows
    assert "dialogues omitted" not in page


def test_without_matches_marks_have_no_class(sample):
    dialogues, metrics, run_info, _, sweep = sample
    page = render_report(dialogues, metrics, run_info, None, sweep)
    svgs = "".join(timelines(page))
    assert 'class="mk k-' not in svgs and svgs.count('class="mk"') == 8


def test_cap_and_omitted_note(sample):
    dialogues, metrics, run_info, matches, sweep = sample
    page = render_report(dialogues, metrics, run_info, matches, sweep, max_dialogues=2, open_first=1)
    assert page.count('<svg class="timeline"') == 2
    assert page.count('<details class="dlg" open>') == 1
    assert "1 of 3 dialogues omitted" in page
    check_well_formed(page)


def charts(page: str) -> list[tuple[str, str]]:
    """(id, title) of each matplotlib chart (eval/charts.py), in page order."""
    return re.findall(r'<svg class="chart" id="([^"]+)" role="img"[^>]*><title>([^<]*)</title>', page)


def group(page: str, gid: str) -> str:
    """The text of the SVG group with this id, up to its first nested group's end (enough for its title)."""
    start = page.index(f'<g id="{gid}">')
    return page[start : page.index("</g>", start)]


def test_threshold_curves(sample):
    page = render_report(*sample)
    names = [(n, d) for n in ("ego4d", "wtag") for d in ("speak", "update")]
    assert charts(page) == [(f"sweep-{i}", f"{n} · {d}: best 0.5, F1 0.400") for i, (n, d) in enumerate(names)]
    curve = group(page, "sweep-3-f1")
    assert "<title>wtag · update: F1 at 9 thresholds, 0.1 to 0.9</title>" in curve
    # the null F1 at 0.8 breaks the line: two stretches, and a marker for each of the 8 values
    assert len(re.findall(r"\bM ", re.search(r'<path d="([^"]*)"', curve)[1])) == 2 and curve.count("<use ") == 8
    assert "<title>best 0.5, F1 0.400</title>" in group(page, "sweep-0-best")
    assert 'id="thresholds"' not in render_report(*sample[:4]) and not charts(render_report(*sample[:4]))


def test_threshold_curve_without_f1_or_best(sample):
    dialogues, metrics, run_info, matches, _ = sample
    sweep = {
        "datasets": {
            "wtag": {
                "speak": {"thresholds": [0.1, 0.2], "f1": [], "best": None},
                "update": {"thresholds": [0.5], "f1": [0.3], "best": 0.5},
            }
        }
    }
    page = render_report(dialogues[:1], metrics, run_info, matches[:1], sweep)
    assert charts(page) == [("sweep-0", "wtag · speak"), ("sweep-1", "wtag · update: best 0.5, F1 0.300")]
    assert 'id="sweep-0-best"' not in page and 'id="sweep-1-best"' in page


def test_charts_are_inline_deterministic_and_their_ids_unique(sample):
    page = render_report(*sample)
    assert page == render_report(*sample)  # fixed hash salt, no date
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page and "<metadata" not in page
    assert page.count("<style") == 1  # matplotlib's own <style> would restyle the whole page
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))
    refs = set(re.findall(r'(?:xlink:href="#|url\(#)([^")]+)', page))
    assert refs and refs <= set(ids)  # glyphs and clip paths resolve inside the page


def test_matplotlib_is_imported_only_where_a_chart_is_drawn():
    """Its import takes about a second: a command that draws no chart must not pay for it."""
    root = Path(__file__).resolve().parents[1]
    files = [root / "cli.py"] + [
        p
        for pkg in ("core", "pipeline", "synthetic", "train", "eval", "experiments")
        for p in (root / pkg).glob("*.py")
    ]
    top = [
        (p.name, a.name if isinstance(n, ast.Import) else n.module)
        for p in files
        for n in ast.parse(p.read_text()).body
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    ]
    assert ("charts.py", "__future__") in top and not [t for t in top if t[1] and t[1].startswith("matplotlib")]


def test_null_probabilities_and_meteor(sample):
    dialogues, metrics, run_info, _, _ = sample
    for d in dialogues:
        for f in d["frames"]:
            f["p_update"] = f["p_speak"] = None
    for m in [metrics["mean"], *metrics["datasets"].values()]:
        m["text"]["METEOR"] = None
    metrics["meteor"] = None
    page = render_report(dialogues, metrics, {"mode": "never-speak"})
    check_well_formed(page)
    assert 'class="spark"' not in page and page.count('<svg class="timeline"') == 3
    assert page.count("not available") >= 4


def test_long_dialogue_stays_small():
    n = 5000
    d = dialogue("long", "assembly101", n, k0=0, events={1000: {"ref_text": "go"}, 1001: {"pred_text": "go"}})
    for f in d["frames"]:  # a third change, late in the video
        if f["frame"] >= 4000:
            f["ref_state"] = dict(f["ref_state"], S2="in_progress")
            f["pred_state"] = dict(f["pred_state"], S2="in_progress")
    metrics = {"sts_model": "m", "meteor": None, "datasets": {"assembly101": block(0.1)}, "mean": block(0.1)}
    page = render_report([d], metrics, {})
    # ref + pred rows: S1 has 3 runs each, S2 2 runs each; the error row has 2 one-frame runs.
    assert page.count('<rect class="st"') == 10 and page.count('<rect class="err"') == 2
    assert len(page) < 120_000, len(page)
    check_well_formed(page)


def test_runs():
    assert runs([]) == []
    assert runs(["a", "a", "b", None, None]) == [(0, 2, "a"), (2, 3, "b"), (3, 5, None)]


def test_empty_dialogue_and_matches_as_dict(sample):
    dialogues, metrics, run_info, matches, _ = sample
    empty = {"dataset": "wtag", "video_uid": "empty", "frames": []}
    page = render_report([dialogues[0], empty], metrics, run_info, {"0": matches[0]})
    assert len(timelines(page)) == 2 and 'class="mk k-matched"' in timelines(page)[0]
    check_well_formed(page)


def test_write_report(tmp_path, sample):
    path = write_report(tmp_path / "out" / "report.html", *sample)
    assert path.read_text(encoding="utf-8") == render_report(*sample)
    assert not list(path.parent.glob("*.tmp"))


@pytest.mark.parametrize(
    "thresholds, lines",
    [
        ({"speak": 0.4, "update": 0.5}, 6),
        ({"all": [0.5, 0.4]}, 6),
        ({"wtag": [0.5, 0.4]}, 2),
        ({"ego4d": {"speak": 0.3}}, 2),
        (None, 0),
    ],
)
def test_threshold_lines_on_probability_strips(sample, thresholds, lines):
    dialogues, metrics, _, matches, _ = sample
    page = render_report(dialogues, metrics, {"thresholds": thresholds}, matches)
    assert page.count('class="theta"') == lines


# ----------------------------------------------------------------------------------------------- round 2 additions


def full_block(f1: float, pro_f1: float, never_joint: float, responsive=None) -> dict:
    b = block(f1)
    intents = {
        "instruction": {"recall": 0.75, "num_ref": 4, "num_matched": 3},
        "feedback": {"recall": 0.5, "num_ref": 2, "num_matched": 1},
        "responsive": {"recall": responsive, "num_ref": 0 if responsive is None else 3, "num_matched": 0},
        "other": {"recall": 0.0, "num_ref": 1, "num_matched": 0},
    }
    b["speak"]["intent_recall"] = intents
    b["speak_proassist"] = {
        **b["speak"],
        "f1": pro_f1,
        "exact_copies": 7,
        "zero_cost_dropped": 5,
        "no_full_matching": 0,
        "intent_recall": {**intents, "instruction": {"recall": 0.25, "num_ref": 4, "num_matched": 1}},
    }
    b["dst_never"] = {**{k: 0.0 for k in b["dst"]}, "joint_accuracy": never_joint, "validity": 1.0}
    b["summary_similarity"], b["reseeds"] = 0.4321, 3
    return b


def test_round_two_metrics_protocol_variant_never_intents_and_reseeds(sample):
    dialogues, _, run_info, matches, sweep = sample
    metrics = {
        "protocol": "proassist",
        "variant": "summary",
        "dst_window_s": 2.0,
        "dialogues_without_reference": 1,
        "reseeds": {"total": 3, "datasets": {"wtag": 3}},
        "meteor_failures": ["wtag: no answer within 120 s"],
        "sts_model": "m",
        "meteor": "pycocoevalcap METEOR 1.5",
        "datasets": {"wtag": full_block(0.3642, 0.2913, 0.0417)},
        "mean": full_block(0.3642, 0.2913, 0.0417, responsive=0.6667),
    }
    dialogues[0]["reseeds"] = [
        {"frame": 14, "row": 4, "strategy": "summary", "summary": EVIL, "ref_progress": "The user opened the lid."},
        {"frame": 99, "row": 89, "strategy": "summary", "summary": "beyond the frames"},
    ]
    page = render_report(dialogues, metrics, run_info, matches, sweep)
    check_well_formed(page)
    header = page[: page.index('<section id="summary">')]
    for text in (
        "protocol",
        "proassist",
        "variant",
        "summary",
        "DST window",
        "re-seeds",
        "METEOR failures",
        "wtag: no answer within 120 s",
    ):
        assert text in header, text
    assert "0.364" in page and "0.291" in page  # speak and speak_proassist F1 side by side
    assert "0.042" in page and "never" in page  # the never-update joint accuracy beside the model's
    assert "exact copies 7" in page and "zero-cost pairs dropped 5" in page and "summary similarity 0.432" in page
    intents = page[page.index('<section id="intents">') :]
    intents = intents[: intents.index("</section>")]
    assert intents.count("<tr>") == 1 + 4  # header + (mean, wtag) x (exact, ProAssist)
    assert "0.750" in intents and "0.250" in intents and "of 4" in intents and "0.667" in intents
    first = timelines(page)[0]
    assert first.count('<g class="reseed">') == 1  # the re-seed at frame 99 lies outside the dialogue's frames
    assert "re-seed before frame 14 (7.0 s): summary" in first
    assert "&lt;script&gt;" in first and "<script>" not in first and "reference progress: The user opened" in first


def test_old_metrics_without_round_two_keys_still_render(sample):
    page = render_report(*sample)
    assert 'id="intents"' not in page and '<g class="reseed">' not in page and "never" not in page
    check_well_formed(page)
