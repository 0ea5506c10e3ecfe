"""`dst eval` and `dst score` end to end on the tiny run (prepare -> train -> eval on CPU)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cli import app
from eval.config import offline_sts_model
from eval.sweep import THRESHOLDS, best_threshold

STS = offline_sts_model()


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_oracle_scores_exactly_one(tiny_shards, tmp_path):
    invoke("eval", "--shards", tiny_shards, "--out", tmp_path, "--mode", "oracle", "--sts-model", STS)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for scope in [*metrics["datasets"].values(), metrics["mean"]]:
        for key in ("precision", "recall", "f1", "jaccard"):
            assert scope["speak"][key] == 1.0, key
        assert all(value == 1.0 for value in scope["dst"].values()), scope["dst"]
    assert set(metrics["datasets"]) == {"wtag", "ego4d"}


def test_model_eval_sweep_and_rescore(tiny_run, tiny_shards, tmp_path):
    out = tmp_path / "val"
    invoke(
        "eval",
        "--ckpt",
        tiny_run,
        "--shards",
        tiny_shards,
        "--out",
        out,
        "--sweep",
        "--sts-model",
        STS,
        "--max-new-tokens",
        "6",
        "--max-context",
        "300",
    )
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 8  # 4 videos x 2 conversations
    frame = lines[0]["frames"][0]
    assert set(frame) >= {
        "frame",
        "time",
        "user_text",
        "p_update",
        "p_speak",
        "pred_dst_delta",
        "ref_dst_delta",
        "pred_state",
        "ref_state",
        "pred_text",
        "ref_text",
    }
    assert isinstance(frame["pred_state"], dict) and 0.0 <= frame["p_speak"] <= 1.0
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "http://" not in html and "https://" not in html
    sweep = json.loads((out / "thresholds.json").read_text())
    for decisions in sweep["datasets"].values():
        for curve in decisions.values():
            assert curve["thresholds"] == THRESHOLDS and len(curve["f1"]) == len(THRESHOLDS)
            assert curve["best"] == best_threshold(curve["thresholds"], curve["f1"])
    assert isinstance(sweep["warnings"], list)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sts_model"] == STS and metrics["meteor"]
    # dst score reproduces metrics.json from predictions.jsonl, with no model
    invoke("score", "--predictions", out / "predictions.jsonl", "--out", tmp_path / "again.json", "--sts-model", STS)
    assert json.loads((tmp_path / "again.json").read_text()) == metrics
    # the swept thresholds carry over to another split
    invoke(
        "eval",
        "--ckpt",
        tiny_run,
        "--shards",
        tiny_shards,
        "--out",
        tmp_path / "test",
        "--thresholds-from",
        out / "thresholds.json",
        "--sts-model",
        STS,
        "--max-new-tokens",
        "6",
        "--max-context",
        "300",
    )
    assert (tmp_path / "test" / "metrics.json").exists()


def test_model_mode_needs_a_checkpoint(tiny_shards, tmp_path):
    result = CliRunner().invoke(app, ["eval", "--shards", str(tiny_shards), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--ckpt is required" in result.output
