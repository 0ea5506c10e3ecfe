"""Hand-computed labels for a record written to hit the awkward cases of docs/design.md §3.

fps 2, video_start_time 2.0 -> k0 = 4; 20 frames -> points 4..19.
"""

from __future__ import annotations

import json

from pipeline.labels import label_columns
from pipeline.records import parse_record
from pipeline.timeline import dst_timeline, place_turns, transition_point, video_labels

RECORD = {
    "video_uid": "edge-video",
    "inferred_goal": "goal",
    "inferred_knowledge": "steps",
    "parsed_video_anns": {"dataset": "wtag", "video_start_time": 2.0, "duration": 8.0},
    "dst": [
        # before the stream (1.0 -> frame 2 < 4): initial in_progress; ends 3.0 -> floor(6) - 1 = point 5
        {"type": "step", "id": "S1", "start_ts": 1.0, "end_ts": 3.0, "name": "a"},
        # overlaps S1: 2.5 -> floor(5) - 1 = 4; 5.0 -> floor(10) - 1 = 9
        {"type": "step", "id": "S2", "start_ts": 2.5, "end_ts": 5.0, "name": "b"},
        # id hole (no S3); end_ts == start_ts: straight to completed at 6.0 -> point 11
        {"type": "step", "id": "S4", "start_ts": 6.0, "end_ts": 6.0, "name": "c"},
        # starts 8.0 -> point 15; ends 12.0 -> floor(24) - 1 = 23 > 19: dropped, stays in_progress
        {"type": "step", "id": "S5", "start_ts": 8.0, "end_ts": 12.0, "name": "d"},
        # both transitions before the stream: initial completed
        {"type": "step", "id": "S6", "start_ts": 0.5, "end_ts": 1.5, "name": "e"},
        # end_ts < start_ts: both at the start, 7.0 -> point 13, completed
        {"type": "step", "id": "S7", "start_ts": 7.0, "end_ts": 6.5, "name": "f"},
    ],
    "conversations": [
        {
            "user_type": "talk_more",
            "conversation": [
                {"role": "user", "time": 1.0, "content": "u-before-start"},  # f 2 <= 4 -> 5: input of point 5
                {"role": "assistant", "time": 3.0, "content": "a-3.0"},  # f 6 -> point 5
                {"role": "assistant", "time": 2.0, "content": "a-out-of-order"},  # f 4 <= 6 -> 7 -> point 6
                {"role": "user", "time": 7.4, "content": "u-7.4"},  # f 14: input of point 14
                {"role": "assistant", "time": 7.0, "content": "a-7.0-late"},  # f 14 <= 14 -> 15 -> point 14
                {"role": "assistant", "time": 50.0, "content": "a-past-end"},  # f 100 -> clamp 19 -> point 18
                {"role": "user", "time": 60.0, "content": "u-dropped"},  # 19 <= 19 -> 20 > 19: dropped
                {"role": "assistant", "time": 61.0, "content": "a-dropped"},  # and everything after it
            ],
        },
        {"user_type": "no_talk", "conversation": []},
    ],
}
N_FRAMES = 20
INITIAL = {
    "S1": "in_progress",
    "S2": "not_started",
    "S4": "not_started",
    "S5": "not_started",
    "S6": "completed",
    "S7": "not_started",
}
UPDATES = {
    4: {"S2": "in_progress"},
    5: {"S1": "completed"},
    9: {"S2": "completed"},
    11: {"S4": "completed"},
    13: {"S7": "completed"},
    15: {"S5": "in_progress"},
}


def labels():
    return video_labels(parse_record(RECORD), N_FRAMES, fps=2.0)


def test_dst_timeline():
    vl = labels()
    assert vl.k0 == 4
    assert vl.dst.initial == INITIAL
    assert vl.dst.updates == UPDATES
    assert vl.dst.dropped == 1
    assert vl.dst.state_after(19) == {
        "S1": "completed",
        "S2": "completed",
        "S4": "completed",
        "S5": "in_progress",
        "S6": "completed",
        "S7": "completed",
    }


def test_turn_placement():
    placement = labels().conversations[0].placement
    assert [(t.content, t.frame, t.point) for t in placement.turns] == [
        ("u-before-start", 5, 5),
        ("a-3.0", 6, 5),
        ("a-out-of-order", 7, 6),
        ("u-7.4", 14, 14),
        ("a-7.0-late", 15, 14),
        ("a-past-end", 19, 18),
    ]
    assert (placement.shifted, placement.clamped, placement.dropped) == (3, 1, 2)
    assert labels().conversations[1].placement.turns == ()


def test_rows():
    cols = label_columns(labels())
    assert len(cols["frame"]) == 2 * 16
    assert cols["frame"][:16] == list(range(4, 20)) and cols["conversation"] == [0] * 16 + [1] * 16
    first = {k: {c: v[i] for c, v in cols.items()} for i, k in enumerate(cols["frame"][:16])}
    assert {k for k, r in first.items() if r["speak"]} == {5, 6, 14, 18}
    assert first[5]["user_text"] == "u-before-start" and first[5]["response"] == "a-3.0"
    assert first[14]["user_text"] == "u-7.4" and first[14]["response"] == "a-7.0-late"
    assert first[18]["response"] == "a-past-end" and first[19]["response"] == "" and not first[19]["speak"]
    assert {k: json.loads(r["dst_delta"]) for k, r in first.items() if r["dst_update"]} == UPDATES
    assert json.loads(first[4]["dst_state"]) == {**INITIAL, "S2": "in_progress"}
    assert json.loads(first[10]["dst_state"]) == {**INITIAL, "S1": "completed", "S2": "completed"}
    # The silent conversation shares the DST labels and never speaks.
    assert cols["dst_state"][16:] == cols["dst_state"][:16] and cols["dst_update"][16:] == cols["dst_update"][:16]
    assert not any(cols["speak"][16:]) and set(cols["response"][16:]) == {""}
    assert cols["time"][0] == 2.5 and cols["user_type"][16] == "no_talk" and cols["dataset"][0] == "wtag"


def test_transition_at_stream_start_frame():
    # 2.2 s is inside frame 4 = k0: point max(4, 4 - 1) = 4, not point 3 before the stream.
    assert transition_point(2.2, k0=4, fps=2.0) == 4
    assert transition_point(1.99, k0=4, fps=2.0) is None
    assert transition_point(2.5, k0=4, fps=2.0) == 4  # floor(5) - 1
    assert transition_point(3.0, k0=4, fps=2.0) == 5


def test_same_point_start_and_end_is_one_update():
    node = parse_record({**RECORD, "dst": [{"id": "S1", "start_ts": 5.1, "end_ts": 5.4, "name": "x"}]}).nodes
    timeline = dst_timeline(node, k0=4, n_frames=20, fps=2.0)
    assert timeline.updates == {9: {"S1": "completed"}}


def test_clamp_against_short_frames_file():
    # A dialogue longer than its frames file (sparse_mismatches.json: a 99-frame file, clips to frame 1264).
    turns = parse_record(RECORD).conversations[0].turns
    placement = place_turns(turns, k0=4, n_frames=8, fps=2.0)
    assert [(t.content, t.frame) for t in placement.turns] == [
        ("u-before-start", 5),
        ("a-3.0", 6),
        ("a-out-of-order", 7),
    ]
    assert placement.dropped == 5 and placement.clamped == 0


def test_empty_assistant_turn_moves_the_cursor_but_is_not_a_speaking_label():
    """A turn with no text (or only spaces) keeps ProAssist's cursor (later turns land where ProAssist puts them)
    but is no response: nothing to learn to say, and no reference to match."""
    record = json.loads(json.dumps(RECORD))
    record["conversations"] = [
        {
            "user_type": "talk_some",
            "conversation": [
                {
                    "role": "assistant",
                    "time": 3.0,
                    "content": "  ",
                    "progress": "p-empty",
                    "labels": "initiative|feedback",
                },
                {
                    "role": "assistant",
                    "time": 2.0,
                    "content": "a-after-empty",
                    "progress": "p-1",
                    "labels": "initiative|instruction",
                },
            ],
        }
    ]
    labels = video_labels(parse_record(record), n_frames=20, fps=2.0)
    conv = labels.conversations[0]
    # f 6 -> point 5 (empty); the next turn is shifted past it exactly as if it had text: f 7 -> point 6
    assert conv.responses == {6: "a-after-empty"}
    assert conv.progress == {6: "p-1"} and conv.response_labels == {6: "initiative|instruction"}
    assert conv.empty_turns == 1 and labels.empty_turns == 1
    cols = label_columns(labels)
    assert [k for k, s in zip(cols["frame"], cols["speak"]) if s] == [6]
    assert [p for p in cols["progress"] if p] == ["p-1"]
