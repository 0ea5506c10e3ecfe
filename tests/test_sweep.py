"""eval/sweep.py: the threshold grid, the choice of the best threshold, edge warnings, thresholds.json."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eval import evaluate as eval_run
from eval.sweep import (
    THRESHOLDS,
    ThresholdsError,
    best_from_sweep,
    best_threshold,
    curve_warnings,
    load_thresholds,
    sweep_thresholds,
    write_thresholds,
)


def embed(texts):
    return np.array([{"a": (1.0, 0.0), "b": (0.0, 1.0)}[t] for t in texts], dtype=np.float32)


def tf_frame(k: int, p_speak: float, gen: str, ref: str, p_update: float = 0.0, gen_delta=None, ref_delta=None):
    """A teacher-forced record: what the model would generate, its probabilities, the references."""
    return {
        "frame": k,
        "p_speak": p_speak,
        "p_update": p_update,
        "gen_text": gen,
        "ref_text": ref,
        "gen_dst_delta": gen_delta or {},
        "gen_dst_text": "",
        "ref_dst_delta": ref_delta or {},
        "state_before": {"S1": "not_started"},
        "ref_state": {"S1": "not_started"},
        "pred_text": "",
        "pred_dst_delta": {},
        "pred_state": {},
        "pred_dst_text": "",
    }


def test_grid_reaches_low_probabilities():
    assert THRESHOLDS[:3] == [0.001, 0.002, 0.005] and THRESHOLDS[-2:] == [0.97, 0.99]
    assert THRESHOLDS == sorted(set(THRESHOLDS)) and 0.05 in THRESHOLDS and 0.95 in THRESHOLDS
    assert len(THRESHOLDS) == 28


def test_best_threshold_is_the_middle_of_the_maximum():
    assert best_threshold([0.1, 0.2, 0.3, 0.4], [0.1, 0.5, 0.5, 0.2]) == 0.2
    assert best_threshold([0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.5, 0.5, 0.1, 0.0]) == 0.2
    assert best_threshold([0.1, 0.2], [0.0, 0.3]) == 0.2


def test_curve_warnings():
    grid = [0.1, 0.2, 0.3]
    assert curve_warnings("wtag", "speak", grid, [0.2, 0.5, 0.1]) == []
    assert "F1 is 0 at every threshold" in curve_warnings("wtag", "speak", grid, [0.0, 0.0, 0.0])[0]
    low = curve_warnings("wtag", "update", grid, [0.5, 0.4, 0.1])
    assert len(low) == 1 and "lowest threshold of the grid (0.1)" in low[0]
    assert "highest" in curve_warnings("wtag", "update", grid, [0.1, 0.4, 0.5])[0]


def test_sweep_finds_a_threshold_below_005_and_warns_at_the_edge(caplog):
    # the model is right but shy: its speaking probabilities are 0.01-0.03 where it should speak, 0.003 elsewhere
    frames = [
        tf_frame(k, {4: 0.02, 12: 0.03, 20: 0.01}.get(k, 0.003), "a", "a" if k in (4, 12, 20) else "")
        for k in range(24)
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
    sweep = sweep_thresholds([d], embed, protocol="full-video")
    speak = sweep["datasets"]["wtag"]["speak"]
    assert speak["thresholds"] == THRESHOLDS and len(speak["f1"]) == len(THRESHOLDS)
    assert speak["f1"][THRESHOLDS.index(0.005)] == 1.0 and speak["f1"][THRESHOLDS.index(0.05)] == 0.0
    assert speak["best"] == 0.005  # only there F1 is 1.0 (below it speaks everywhere, at 0.01 it misses frame 20)
    assert not any("wtag speak" in w for w in sweep["warnings"])
    update = sweep["datasets"]["wtag"]["update"]
    assert update["f1"] == [1.0] * len(THRESHOLDS) and update["best"] == THRESHOLDS[13]  # vacuous: no updates
    assert any("wtag update: the best F1" in w for w in sweep["warnings"])
    assert (sweep["protocol"], sweep["dst_window_s"]) == ("full-video", 2.0)
    assert frames[4]["pred_text"] == ""  # the caller's records are left alone
    assert best_from_sweep(sweep) == {"wtag": (update["best"], 0.005)}


def test_sweep_warns_when_f1_is_zero_everywhere(caplog):
    frames = [tf_frame(k, 0.9 if k == 2 else 0.0, "b", "a" if k == 2 else "") for k in range(10)]
    d = {
        "dataset": "ego4d",
        "video_uid": "v",
        "conversation": 0,
        "fps": 2.0,
        "variant": "dst",
        "protocol": "full-video",
        "frames": frames,
    }
    sweep = sweep_thresholds([d], embed)
    assert sweep["datasets"]["ego4d"]["speak"]["f1"] == [0.0] * len(THRESHOLDS)
    assert any("ego4d speak: F1 is 0 at every threshold" in w for w in sweep["warnings"])
    assert "F1 is 0 at every threshold" in caplog.text


def write_file(path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


CURVES = {"update": {"best": 0.3}, "speak": {"best": 0.02}}


def test_load_thresholds_round_trip_and_refusals(tmp_path):
    path = tmp_path / "thresholds.json"
    write_thresholds(path, {"datasets": {"wtag": CURVES, "ego4d": CURVES}, "warnings": []})
    assert load_thresholds(path, {"wtag"}) == {"wtag": (0.3, 0.02), "ego4d": (0.3, 0.02)}
    with pytest.raises(ThresholdsError, match=r"has no thresholds for dataset\(s\) assembly101 \(it has ego4d, wtag\)"):
        load_thresholds(path, {"wtag", "assembly101"})
    bad = {
        "malformed": "{",
        "nested": "[" * 100_000,
        "no datasets": {"x": 1},
        "missing speak": {"datasets": {"wtag": {"update": {"best": 0.5}}}},
        "nan": '{"datasets": {"wtag": {"update": {"best": NaN}, "speak": {"best": 0.5}}}}',
        "above one": {"datasets": {"wtag": {"update": {"best": 1.5}, "speak": {"best": 0.5}}}},
    }
    for name, data in bad.items():
        with pytest.raises(ThresholdsError) as err:
            load_thresholds(write_file(tmp_path / f"{name}.json", data), {"wtag"})
        assert f"{name}.json" in str(err.value), name
    with pytest.raises(ThresholdsError, match="file not found"):
        load_thresholds(tmp_path / "missing.json")
    with pytest.raises(eval_run.EvalError, match="assembly101"):  # dst eval turns it into its usual error
        eval_run._load_thresholds(path, {"assembly101"})
