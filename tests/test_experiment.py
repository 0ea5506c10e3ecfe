"""`dst experiment`: config checks before anything runs, the grid, resuming a killed grid (stages stubbed), the
reports' statistics and marks, and one real end-to-end --fast run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from experiments import compare
from experiments import report as rep
from experiments import runner as ex
from experiments.grid import ExperimentConfigError, load

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "experiments"
BASE = """
[experiment]
name = "t"
seeds = [0, 1]
[data]
setting = "demo"
videos = [4, 2, 2]
[train]
max_steps = 5
[[grid]]
variant = ["dst", "none"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "change, message",
    [
        (("[data]", "[data]\ncolour = 1"), "data.colour: unknown data setting"),
        (("[train]", "[train]\nlearning_rate = 1"), "train.learning_rate: unknown train setting"),
        (("[train]", "[train]\nseed = 3"), "train.seed: is set by the runner"),
        (("max_steps = 5", 'max_steps = "many"'), "train.max_steps: must be an integer, got 'many'"),
        (("[train]", '[train]\ndecision_loss = "hinge"'), "decision_loss must be one of"),
        (("[train]", "[train]\nrho = 0.0"), "rho must be > 0, got 0.0"),
        (('variant = ["dst", "none"]', 'variant = ["dst", "ips"]'), "variant must be one of"),
        (('variant = ["dst", "none"]', 'variant = "dst"'), "grid[0].variant: must be a non-empty list"),
        (('variant = ["dst", "none"]', "temperature = [1]"), "grid[0].temperature: unknown setting"),
        (("[data]", '[eval]\ncontext_strategy = "forget"\n[data]'), "eval.context_strategy: must be one of"),
        (("[data]", "[eval]\nmax_context = 9000\n[data]"), "exceeds the training max_seq_len 4096"),
        (('setting = "demo"', 'setting = "huge"'), "data.setting: must be one of"),
        (("videos = [4, 2, 2]", "videos = [4, 2]"), "data.videos: must be [train, val, test]"),
        (("seeds = [0, 1]", "seeds = [0, 0]"), "experiment.seeds: must be a non-empty list of distinct"),
        (("[data]", "[plots]\nx = 1\n[data]"), "plots: unknown table"),
        (("[data]", "[fast]\nseeds = 0\n[data]"), "fast.seeds: must be a number of seeds >= 1"),
    ],
)
def test_bad_configs_are_refused_with_the_key_named(tmp_path, change, message):
    old, new = change
    assert old in BASE
    path = write(tmp_path, BASE.replace(old, new, 1))
    with pytest.raises(ExperimentConfigError) as info:
        load(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_the_cli_refuses_a_bad_config_before_anything_runs(tmp_path):
    path = write(tmp_path, BASE.replace("[train]", "[train]\nlearning_rate = 1"))
    result = CliRunner().invoke(app, ["experiment", "--config", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "train.learning_rate: unknown train setting" in result.output
    assert not (tmp_path / "out").exists()


def test_the_study_configs():
    memory = load(CONFIGS / "memory.toml")
    assert memory.data["setting"] == "long" and len(memory.seeds) >= 3
    assert [c.name for c in memory.cells] == [
        "variant=dst",
        "variant=summary",
        "variant=none",
        "variant=dst context_strategy=drop-all",
    ]
    # drop-all is an eval setting: it reuses the dst training runs
    assert memory.cells[0].train_slug == memory.cells[3].train_slug != memory.cells[1].train_slug
    assert memory.cells[3].eval["context_strategy"] == "drop-all"
    losses = load(CONFIGS / "decision_loss.toml")
    assert [c.name for c in losses.cells] == ["decision_loss=focal", "decision_loss=balanced_bce", "decision_loss=bce"]
    assert losses.cells[0].train["max_steps"] == 2500 and len(losses.seeds) >= 3
    imbalance = load(CONFIGS / "imbalance.toml")
    assert imbalance.data["setting"] == "demo" and len(imbalance.seeds) >= 3
    assert [c.name for c in imbalance.cells] == [
        "decision_loss=focal rho=1.0 focal_alpha=0.25",
        "decision_loss=focal rho=1.0 focal_alpha=0.75",
        "decision_loss=focal rho=0.1 focal_alpha=0.25",
        "decision_loss=focal rho=0.1 focal_alpha=0.75",
        "decision_loss=balanced_bce rho=1.0",
        "decision_loss=balanced_bce rho=0.1",
        "decision_loss=bce rho=1.0",
        "decision_loss=bce rho=0.1",
    ]
    tracking = load(CONFIGS / "tracking.toml")
    assert [c.name for c in tracking.cells] == ["decision_loss=focal", "decision_loss=bce"]
    assert tracking.curves and tracking.cells[1].train["max_steps"] == 3000
    tracked = load(CONFIGS / "memory_tracked.toml")  # Study 3b: Study 3 with Study 3a's learner, in every cell
    assert len(tracked.seeds) >= 3 and tracked.data["videos"][2] >= 20
    assert all(c.train["decision_loss"] == "bce" and c.train["max_steps"] == 2000 for c in tracked.cells)
    assert {c.eval.get("context_strategy") for c in tracked.cells} >= {"reseed-oracle", "drop-all"}
    fast = load(CONFIGS / "memory.toml", fast=True)
    assert fast.seeds == (0, 1) and fast.data["videos"] == [2, 1, 1]
    assert fast.cells[0].train["max_steps"] == 3 and fast.cells[0].eval["max_new_tokens"] == 4


# ----------------------------------------------------------------------------------------------- reports


def _line(cell: str, seed, value: float, variant: str = "dst", extra: dict | None = None) -> dict:
    return {
        "cell": cell,
        "seed": seed,
        "config": {"train": {"variant": variant}},
        "metrics": {"test.mean.speak.f1": value, "test.mean.dst.joint_accuracy": value / 2, **(extra or {})},
        "stream": {"test.reseeds_per_dialogue": 4.0},
        "timings": {"train_s": 120.0},
    }


def test_flatten_and_statistics():
    assert rep.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": 1, "a.c.d": [1, 2], "e": "x"}
    s = rep.Stat((0.5, 0.6, 0.7))
    assert s.mean == pytest.approx(0.6) and s.std == pytest.approx(0.1)
    assert rep.Stat((0.3,)).std == 0.0


def test_a_difference_inside_the_spread_is_not_a_win():
    stats = {"a": rep.Stat((0.5, 0.6, 0.7)), "b": rep.Stat((0.45, 0.55, 0.65)), "c": rep.Stat((0.1, 0.1, 0.1))}
    assert rep.marked(stats, ["a", "b", "c"]) == {"a", "b"}  # 0.05 apart, spread 0.1: a tie
    assert rep.marked(stats, ["a", "c"]) == {"a"}  # a clear win
    assert rep.marked(stats, ["a", "b", "c"], lower_is_better=True) == {"c"}


def test_summary_marks_and_fallback_keys(tmp_path):
    cfg = load(write(tmp_path, BASE))
    lines = [_line("variant=dst", s, v) for s, v in ((0, 0.8), (1, 0.9))] + [
        _line("variant=none", s, v, "none") for s, v in ((0, 0.3), (1, 0.5))
    ]
    text = rep.summary_markdown(cfg, lines)
    # no speak_proassist in these lines: the column falls back to speak and says so
    assert "speaking F1 (`test.mean.speak.f1`)" in text
    assert "| variant=dst | 2 | **0.850 ± 0.071** |" in text
    assert "| variant=none | 2 | 0.400 ± 0.141 |" in text
    assert "| **0.425 ± 0.035** |" in text  # dst's joint accuracy, the only one
    assert text.count("n/a") >= 1  # none tracks no DST: its joint accuracy is not shown
    lines.append(_line("variant=none", 2, 0.3, "none", {"test.mean.speak_proassist.f1": 0.2}))
    assert "speaking F1 (`test.mean.speak_proassist.f1`)" in rep.summary_markdown(cfg, lines)
    html = rep.report_html(cfg, lines[:4])
    assert html.startswith("<!DOCTYPE html>") and '<svg class="chart"' in html and "http" not in html


def _group(html: str, gid: str) -> str:
    """An SVG group of a chart, up to its first nested group's end (enough for its hover title and its fill)."""
    start = html.index(f'<g id="{gid}">')
    return html[start : html.index("</g>", start)]


def test_html_bars_and_learning_curves(tmp_path):
    cfg = load(write(tmp_path, BASE))

    def curve(j2, j4, f2, f4):
        return [{"step": 2, "joint_accuracy": j2, "speak_f1": f2}, {"step": 4, "joint_accuracy": j4, "speak_f1": f4}]

    lines = [
        dict(_line("variant=dst", 0, 0.8), curve=curve(0.5, 0.6, 0.2, 0.3)),
        dict(_line("variant=dst", 1, 0.9), curve=curve(0.7, 0.8, 0.4, 0.5)),
        dict(_line("variant=none", 0, 0.3, "none"), curve=curve(None, None, 0.1, 0.2)),
        dict(_line("variant=none", 1, 0.5, "none"), curve=curve(None, None, 0.3, 0.2)),
    ]
    assert rep.curve_rows(lines) == [
        ["variant=dst", "2", "0.600 ± 0.141", "0.300 ± 0.141"],
        ["variant=dst", "4", "0.700 ± 0.141", "0.400 ± 0.141"],
        ["variant=none", "2", "n/a", "0.200 ± 0.141"],
        ["variant=none", "4", "n/a", "0.200 ± 0.000"],
    ]
    assert "| variant=none | 4 | n/a | 0.200 ± 0.000 |" in rep.summary_markdown(cfg, lines)
    html = rep.report_html(cfg, lines)
    assert html == rep.report_html(cfg, lines)  # deterministic
    # METEOR and semantic score are in no line: no chart for them
    assert re.findall(r'<svg class="chart" id="([^"]+)" role="img"[^>]*><title>([^<]*)</title>', html) == [
        ("learning-curves", "learning curves: val DST joint accuracy, val speaking F1"),
        ("bars-0", "speaking F1"),
        ("bars-1", "joint accuracy"),
    ]
    dst, none = _group(html, "bars-0-bar0"), _group(html, "bars-0-bar1")
    assert "<title>variant=dst: 0.8500 ± 0.0707 (2 values)</title>" in dst and "fill: #2f9e44" in dst  # the win
    assert "<title>variant=none: 0.4000 ± 0.1414 (2 values)</title>" in none and "fill: #868e96" in none
    assert "<title>variant=dst, single seeds: 0.8000, 0.9000</title>" in _group(html, "bars-0-seeds0")
    assert 'id="bars-1-bar1"' not in html  # none tracks no DST: no joint-accuracy bar
    # one line per cell and panel; none has no joint accuracy, so no line in that panel
    assert "<title>variant=dst · val DST joint accuracy: step 2 0.600, step 4 0.700</title>" in _group(
        html, "learning-curves-p0-s0"
    )
    assert 'id="learning-curves-p0-s1"' not in html
    assert "<title>variant=none · val speaking F1: step 2 0.200, step 4 0.200</title>" in _group(
        html, "learning-curves-p1-s1"
    )
    assert 'id="learning-curves"' not in rep.report_html(cfg, [_line("variant=dst", 0, 0.8)])


# ----------------------------------------------------------------------------------------------- resuming


class Stubs:
    """Train and eval stand-ins that write what the runner reads, count calls, and fail on request."""

    def __init__(self, monkeypatch, tmp_path):
        self.train_calls, self.eval_calls, self.fail_eval_at, self.stop_at_step = [], [], None, None
        monkeypatch.setattr(ex, "prepare_data", lambda cfg, out, console: {s: tmp_path / s for s in ex.SPLITS})
        monkeypatch.setattr(ex.train_run, "run", self.train)
        monkeypatch.setattr(ex.eval_run, "run", self.evaluate)

    def train(self, cfg, console=None):
        self.train_calls.append((cfg.out.parent.name, cfg.seed, cfg.resume))
        last = cfg.out / "checkpoints" / "last"
        last.mkdir(parents=True, exist_ok=True)
        step = self.stop_at_step or cfg.max_steps
        (last / "trainer.json").write_text(json.dumps({"step": step}))

    def evaluate(self, cfg, console=None):
        self.eval_calls.append(str(cfg.out))
        if self.fail_eval_at is not None and len(self.eval_calls) == self.fail_eval_at:
            raise KeyboardInterrupt
        cfg.out.mkdir(parents=True, exist_ok=True)
        seed = 0 if cfg.ckpt is None else int(cfg.ckpt.parent.parent.name.split("-")[1])
        metrics = {"mean": {"speak": {"f1": 0.5 + 0.1 * seed}, "dst": {"joint_accuracy": 0.7}}, "sts_model": "x"}
        (cfg.out / "metrics.json").write_text(json.dumps(metrics))
        (cfg.out / "predictions.jsonl").write_text(json.dumps({"reseeds": [{}, {}, {}]}) + "\n")
        if cfg.sweep:
            best = {"update": {"best": 0.3}, "speak": {"best": 0.4}}
            (cfg.out / "thresholds.json").write_text(json.dumps({"datasets": {"d": best}}))


def test_a_killed_grid_resumes_where_it_stopped(tmp_path, monkeypatch):
    stubs = Stubs(monkeypatch, tmp_path)
    cfg_path = write(
        tmp_path,
        BASE.replace('"none"]', '"none"]\ncontext_strategy = ["reseed", "drop-all"]').replace(
            "seeds = [0, 1]", 'seeds = [0, 1]\nbaselines = ["never"]'
        ),
    )
    out = tmp_path / "out"
    stubs.fail_eval_at = 5  # baseline, cell 1 seed 0 (val, test), cell 1 seed 1 val, then killed at its test
    with pytest.raises(KeyboardInterrupt):
        ex.run(ex.ExperimentRunConfig(cfg_path, out))
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [(x["cell"], x["seed"]) for x in lines] == [
        ("variant=dst context_strategy=reseed", 0),
        ("baseline never", None),
    ]
    assert lines[0]["metrics"]["test.mean.speak.f1"] == 0.5 and lines[0]["stream"]["test.reseeds_per_dialogue"] == 3
    assert lines[0]["thresholds"] == {"d": {"update": 0.3, "speak": 0.4}}
    stubs.fail_eval_at, stubs.train_calls, stubs.eval_calls = None, [], []
    lines = ex.run(ex.ExperimentRunConfig(cfg_path, out))
    assert len(lines) == 2 * 4 + 1
    # nothing finished was redone: the killed test split reran, the val split of that cell did not
    assert stubs.eval_calls[0].endswith("variant-dst_context_strategy-reseed/seed-1/test")
    assert not [c for c in stubs.eval_calls if "variant-dst_context_strategy-reseed" in c and c != stubs.eval_calls[0]]
    # trainings: dst seed 0 and 1 were done before the kill; drop-all reuses them; none trains twice
    assert [c[2] for c in stubs.train_calls] == [False, False]
    assert {c[0] for c in stubs.train_calls} == {load(cfg_path).cells[2].train_slug}
    reused = [x["timings"]["train_reused"] for x in lines if x["seed"] is not None]
    assert reused == [False, False, True, True, False, False, True, True]
    summary = (out / "summary.md").read_text()
    assert "| variant=dst context_strategy=reseed | 2 | **0.550 ± 0.071** |" in summary
    # rerunning a finished grid does nothing
    stubs.train_calls, stubs.eval_calls = [], []
    assert len(ex.run(ex.ExperimentRunConfig(cfg_path, out))) == 9
    assert stubs.train_calls == [] and stubs.eval_calls == []


def test_half_finished_training_resumes_or_restarts(tmp_path, monkeypatch):
    stubs = Stubs(monkeypatch, tmp_path)
    cfg_path = write(tmp_path, BASE.replace("seeds = [0, 1]", "seeds = [0]"))
    cfg = load(cfg_path)
    out = tmp_path / "out"
    with_ckpt = out / "runs" / cfg.cells[0].train_slug / "seed-0"
    (with_ckpt / "checkpoints" / "last").mkdir(parents=True)
    without_ckpt = out / "runs" / cfg.cells[1].train_slug / "seed-0"
    without_ckpt.mkdir(parents=True)
    (without_ckpt / "metrics.jsonl").write_text("{}\n")
    ex.run(ex.ExperimentRunConfig(cfg_path, out))
    assert stubs.train_calls == [(cfg.cells[0].train_slug, 0, True), (cfg.cells[1].train_slug, 0, False)]
    assert not (without_ckpt / "metrics.jsonl").exists()  # the run without a checkpoint started over


def test_an_interrupted_training_stops_the_grid(tmp_path, monkeypatch):
    stubs = Stubs(monkeypatch, tmp_path)
    stubs.stop_at_step = 2  # what dst train does on SIGTERM: save, return early
    with pytest.raises(ex.ExperimentError, match="stopped at step 2 of 5; rerun the same command to resume"):
        ex.run(ex.ExperimentRunConfig(write(tmp_path, BASE), tmp_path / "out"))
    assert stubs.eval_calls == []


def test_a_folder_of_another_experiment_is_refused(tmp_path, monkeypatch):
    stubs = Stubs(monkeypatch, tmp_path)
    out = tmp_path / "out"
    ex.run(ex.ExperimentRunConfig(write(tmp_path, BASE.replace("seeds = [0, 1]", "seeds = [0]")), out))
    stubs.train_calls = []
    with pytest.raises(ex.ExperimentError, match="other data"):
        ex.run(ex.ExperimentRunConfig(write(tmp_path, BASE.replace("[4, 2, 2]", "[5, 2, 2]")), out))
    with pytest.raises(ex.ExperimentError, match="cell 'variant=dst' was run with other settings"):
        ex.run(ex.ExperimentRunConfig(write(tmp_path, BASE.replace("max_steps = 5", "max_steps = 6")), out))
    assert stubs.train_calls == []


# ----------------------------------------------------------------------------------------------- end to end


def test_fast_end_to_end(tmp_path):
    """The real stages (generate, prepare, train, eval) through the command line on a --fast grid."""
    config = write(
        tmp_path,
        """
[experiment]
name = "e2e"
seeds = [0, 1, 2]
[data]
setting = "demo"
videos = [8, 4, 4]
[train]
max_steps = 50
lora = false
batch_size = 2048
max_seq_len = 2048
num_workers = 0
[eval]
max_context = 2048
[[grid]]
context_strategy = ["reseed"]
[fast]
videos = [2, 1, 1]
seeds = 2
[fast.train]
max_steps = 2
eval_every = 2
[fast.eval]
max_new_tokens = 3
""",
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["experiment", "--config", str(config), "--out", str(out), "--fast", "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [(x["cell"], x["seed"]) for x in lines] == [("context_strategy=reseed", 0), ("context_strategy=reseed", 1)]
    assert all(x["config"]["fast"] and x["config"]["train"]["max_steps"] == 2 for x in lines)
    for x in lines:
        for split in ("val", "test"):
            metrics = rep.flatten(
                json.loads(
                    (
                        out / "cells" / x["cell"].replace("=", "-") / f"seed-{x['seed']}" / split / "metrics.json"
                    ).read_text()
                )
            )
            assert {f"{split}.{k}": v for k, v in metrics.items()}.items() <= x["metrics"].items()
    assert [x["timings"]["train_reused"] for x in lines] == [False, False]
    assert lines[0]["config"]["train"]["seed"] == 0 and lines[1]["config"]["train"]["seed"] == 1
    assert "| context_strategy=reseed | 2 |" in (out / "summary.md").read_text()
    assert "<svg" in (out / "report.html").read_text()
    # --rescore: metrics come back from the predictions alone (a tampered line is restored), nothing else runs
    cell = out / "cells" / "context_strategy-reseed" / "seed-0"
    before = json.loads((cell / "result.json").read_text())
    (cell / "result.json").write_text(json.dumps({**before, "metrics": {"test.mean.speak.f1": -1.0}}))
    (cell / "test" / "metrics.json").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("predictions.jsonl")}
    result = CliRunner().invoke(app, ["experiment", "--config", str(config), "--out", str(out), "--fast", "--rescore"])
    assert result.exit_code == 0, result.output
    after = json.loads((cell / "result.json").read_text())
    assert after["metrics"] == before["metrics"] and after["rescored"]["git_commit"] == before["git_commit"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("predictions.jsonl")} == stamps
    assert [json.loads(x)["metrics"] for x in (out / "results.jsonl").read_text().splitlines()] == [
        x["metrics"] for x in lines
    ]
    # --jobs 2: the two seeds train and stream in two processes at once, with the same results as --jobs 1
    out2 = tmp_path / "out2"
    result = CliRunner().invoke(
        app, ["experiment", "--config", str(config), "--out", str(out2), "--fast", "--jobs", "2"]
    )
    assert result.exit_code == 0, result.output
    assert sorted((out2 / "logs").iterdir()) and len(list((out2 / "logs").iterdir())) == 2
    parallel = [json.loads(x) for x in (out2 / "results.jsonl").read_text().splitlines()]
    assert [(x["cell"], x["seed"], x["metrics"], x["thresholds"]) for x in parallel] == [
        (x["cell"], x["seed"], x["metrics"], x["thresholds"]) for x in lines
    ]


def test_paired_bootstrap_is_reproducible_and_covers_a_known_difference():
    """20 dialogues x 3 seeds, a - b = 0.1 plus noise: the interval holds 0.1 and not 0, the same for the same
    seed; with no difference at all the interval holds 0 and it is not a win."""
    rng = np.random.default_rng(1)
    a, b = [], []
    for seed in range(3):
        base = [
            {
                "dataset": "d",
                "video_uid": f"v{i}",
                "conversation": 0,
                "speak_proassist_f1": float(x),
                "memory_speak_proassist_f1": None if i % 4 == 0 else float(x),
            }
            for i, x in enumerate(rng.random(20))
        ]
        shifted = [
            {**d, "speak_proassist_f1": d["speak_proassist_f1"] + 0.1 + float(rng.normal(0, 0.05))} for d in base
        ]
        b.append({"cell": "b", "seed": seed, "metrics": {"test.per_dialogue": base}})
        a.append({"cell": "a", "seed": seed, "metrics": {"test.per_dialogue": shifted}})
    result = compare.compare(a + b, "a", "b")
    allt = result["all turns"]
    assert (allt.n_dialogues, allt.n_pairs) == (20, 60)
    assert allt.low < 0.1 < allt.high and allt.low > 0 and allt.win
    assert compare.compare(a + b, "a", "b")["all turns"] == allt  # seeded: the same interval again
    assert compare.bootstrap(compare.paired_differences(a, b, "speak_proassist_f1"), seed=1) != allt
    memory = result["memory turns"]  # dialogues without memory turns drop out; the memory values are equal
    assert (memory.n_dialogues, memory.mean, memory.low, memory.high, memory.win) == (15, 0.0, 0.0, 0.0, False)
    none = compare.compare(b + [{**x, "cell": "c"} for x in b], "c", "b")["all turns"]
    assert none.low <= 0 <= none.high and not none.win


def test_study3_fast(tmp_path):
    """Study 3's own config, --fast, in two processes: every cell and the baseline stream, the memory/local split
    is scored, the paired comparisons and the learning curves reach the summary."""
    config = load(CONFIGS / "memory_bounds.toml")
    names = [c.name for c in config.cells]
    assert names == [
        "variant=dst",
        "variant=summary",
        "variant=none",
        "variant=dst context_strategy=reseed-oracle",
        "variant=summary context_strategy=reseed-oracle",
        "variant=dst context_strategy=drop-all",
        "variant=dst curriculum_steps=300 curriculum_max_seq_len=384",
        "variant=none max_seq_len=3584 batch_size=3584 max_context=3584",
    ]
    assert len(config.seeds) == 3 and config.data["videos"][2] >= 20 and config.curves
    assert len({c.train_slug for c in config.cells}) == 5  # the oracle and drop-all cells reuse their trainings
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["experiment", "--config", str(CONFIGS / "memory_bounds.toml"), "--out", str(out), "--fast", "--jobs", "2"]
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(x["cell"] for x in lines) == sorted(names + ["baseline never"])
    for x in lines:
        if x["seed"] is not None:
            assert "test.mean.memory_split.memory.speak_proassist.f1" in x["metrics"], x["cell"]
            assert x["curve"], x["cell"]
    summary = (out / "summary.md").read_text()
    assert "## Paired comparisons" in summary and "## Learning curves" in summary
    assert "| variant=dst context_strategy=reseed-oracle - variant=none | memory turns |" in summary
