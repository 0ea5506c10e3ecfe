"""`dst demo --fast`: the whole pipeline on synthetic tasks; the trained model must beat the baselines."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cli import app


def test_fast_demo_beats_the_baselines(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--fast", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"model-dst", "never", "periodic", "oracle"}
    model, never, periodic, oracle = (summary[k] for k in ("model-dst", "never", "periodic", "oracle"))
    assert oracle["speak_f1"] == oracle["update_f1"] == oracle["joint_accuracy"] == 1.0
    for baseline in (never, periodic):
        assert model["speak_f1"] > baseline["speak_f1"] + 0.2
        assert model["update_f1"] > baseline["update_f1"] + 0.2
        assert model["joint_accuracy"] > baseline["joint_accuracy"]
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    # the demo is an experiment run by the runner: its cells, results lines and reports are the runner's
    assert (out / "experiment" / "cells" / "variant-dst" / "seed-0" / "val" / "thresholds.json").exists()
    lines = [json.loads(x) for x in (out / "experiment" / "results.jsonl").read_text().splitlines()]
    assert [ln["cell"] for ln in lines] == ["variant=dst", "baseline never", "baseline periodic", "baseline oracle"]
    assert lines[0]["metrics"]["test.mean.speak.f1"] == model["speak_f1"]
