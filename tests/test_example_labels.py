"""Hand-computed labels for the bundled example record (assembly101 video 9011-c03f).

video_start_time 95.2 -> k0 = floor(2 * 95.2) = 190. The synthetic frames file covers the video to
95.2 + 128.0 s -> 446 frames, so the stream is points 190..445 (256 points).
"""

from __future__ import annotations

import json

import polars as pl
import pytest
from conftest import EXAMPLE_JSON, write_dummy_frames

from pipeline import labels as labels_cmd

UID = "assembly_nusar-2021_action_both_9011-c03f_9011_user_id_2021-02-01_160239__HMC_84355350_mono10bit"
NODES = ["S1", "S2", "S3", "S4", "S5", "S6"]
# (start point, end point) = max(k0, floor(2 * ts) - 1): S1 97.2 -> 193, 118.7 -> 236; S2 130.7 -> 260,
# 136.7 -> 272; S3 152.1 -> 303, 162.1 -> 323; S4 185.0 -> 369, 195.0 -> 389; S5 205.0 -> 409, 215.0 -> 429;
# S6 225.0 -> 449 and 235.0 -> 469 are past the last frame (445): both dropped, S6 stays not_started.
SPANS = {"S1": (193, 236), "S2": (260, 272), "S3": (303, 323), "S4": (369, 389), "S5": (409, 429)}
# Turns, cursor rule from k0 = 190: user 97.2 -> f 194 (input of point 194); assistant 97.2 -> f 194 <= cursor, so
# 195 -> response at 194; 106.8 -> 213 -> 212; 112.7 -> 225 -> 224; 130.7 -> 261 -> 260; 152.1 -> 304 -> 303;
# 185.0 -> 370 -> 369; 197.9 -> 395 -> 394; 212.3 -> 424 -> 423.
SPEAK_POINTS = [194, 212, 224, 260, 303, 369, 394, 423]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("example")
    write_dummy_frames(tmp / "frames", "assembly101", UID, 446)
    cfg = labels_cmd.LabelsConfig(EXAMPLE_JSON, tmp / "frames", tmp / "labels.parquet")
    report = labels_cmd.run(cfg)
    assert (report.written_videos, report.dropped_transitions, report.shifted_turns) == (1, 2, 1)
    return pl.read_parquet(cfg.out)


def expected_state(k: int) -> dict:
    state = {}
    for node in NODES:
        start, end = SPANS.get(node, (10**9, 10**9))
        state[node] = "completed" if k >= end else "in_progress" if k >= start else "not_started"
    return state


def test_shape_and_columns(rows):
    assert rows.columns == [
        "dataset",
        "video_uid",
        "conversation",
        "user_type",
        "frame",
        "time",
        "user_text",
        "dst_update",
        "dst_delta",
        "dst_state",
        "speak",
        "response",
        "progress",
    ]
    assert rows.height == 256
    assert rows["frame"].to_list() == list(range(190, 446))
    assert rows["time"][0] == 95.5 and rows["time"][-1] == 223.0  # (k + 1) / fps
    assert set(rows["dataset"]) == {"assembly101"} and set(rows["video_uid"]) == {UID}
    assert set(rows["conversation"]) == {0} and set(rows["user_type"]) == {"no_talk"}


def test_dst_updates(rows):
    updates = rows.filter(pl.col("dst_update"))
    assert {k: json.loads(d) for k, d in zip(updates["frame"], updates["dst_delta"])} == {
        193: {"S1": "in_progress"},
        236: {"S1": "completed"},
        260: {"S2": "in_progress"},
        272: {"S2": "completed"},
        303: {"S3": "in_progress"},
        323: {"S3": "completed"},
        369: {"S4": "in_progress"},
        389: {"S4": "completed"},
        409: {"S5": "in_progress"},
        429: {"S5": "completed"},
    }
    assert set(rows.filter(~pl.col("dst_update"))["dst_delta"]) == {""}


def test_dst_state_every_point(rows):
    for frame, state in zip(rows["frame"], rows["dst_state"]):
        assert json.loads(state) == expected_state(frame), frame
    # A gap: between S1's end (236) and S2's start (260) no step is in progress.
    gap = rows.filter((pl.col("frame") >= 236) & (pl.col("frame") < 260))
    assert gap.height == 24
    assert all("in_progress" not in s for s in gap["dst_state"])
    # S6 starts past the end of the frames: never leaves not_started.
    assert json.loads(rows["dst_state"][-1])["S6"] == "not_started"
    assert list(json.loads(rows["dst_state"][0])) == NODES  # every node, in dst order


def test_speak_and_texts(rows, example_record):
    turns = example_record["conversations"][0]["conversation"]
    assistant = [t["content"] for t in turns if t["role"] == "assistant"]
    spoken = rows.filter(pl.col("speak"))
    assert spoken["frame"].to_list() == SPEAK_POINTS
    assert spoken["response"].to_list() == assistant
    assert set(rows.filter(~pl.col("speak"))["response"]) == {""}
    # Each response carries its own turn's progress summary; silent points carry none.
    assert spoken["progress"].to_list() == [t.get("progress", "") for t in turns if t["role"] == "assistant"]
    assert spoken["progress"][0].startswith("The time elapsed since the start of the task is 97.2 seconds.")
    assert set(rows.filter(~pl.col("speak"))["progress"]) == {""}
    users = rows.filter(pl.col("user_text") != "")
    assert users["frame"].to_list() == [194]
    assert users["user_text"][0] == turns[0]["content"]
    # The user turn and the first assistant turn share the time 97.2: both land on point 194.
    row = rows.filter(pl.col("frame") == 194).row(0, named=True)
    assert row["speak"] and row["user_text"] and row["response"] == assistant[0]


def test_summary_counts(rows, tmp_path):
    path = tmp_path / "l.parquet"
    rows.write_parquet(path)
    summary = labels_cmd.summary_frame(path).row(0, named=True)
    assert summary == {
        "dataset": "assembly101",
        "videos": 1,
        "conversations": 1,
        "decision_points": 256,
        "speak_rate": 8 / 256,
        "update_rate": 10 / 256,
    }
