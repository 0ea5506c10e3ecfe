"""Our time-to-frame rule against ProAssist's own output: every `frames` turn of six real prepared dialogues."""

from __future__ import annotations

import json

import pytest
from conftest import PROASSIST_JSONL

from pipeline.records import Turn
from pipeline.timeline import place_turns

DIALOGUES = [json.loads(line) for line in PROASSIST_JSONL.read_text().splitlines() if line.strip()]


def test_fixture_has_six_dialogues():
    assert len(DIALOGUES) == 6
    assert {d["metadata"]["user_type"] for d in DIALOGUES} == {"no_talk", "talk_some", "talk_more"}


@pytest.mark.parametrize("dialogue", DIALOGUES, ids=lambda d: f"{d['video_uid'][:24]}-{d['metadata']['user_type']}")
def test_place_turns_reproduces_every_frames_turn(dialogue):
    convo = dialogue["conversation"]
    turns = [Turn(t["role"], t["time"], t["content"]) for t in convo if t["role"] in ("user", "assistant")]
    # ProAssist's frames turns: each text turn is preceded by the frames [start, end) seen since the previous one.
    expected = [
        (convo[i - 1]["start"], convo[i - 1]["end"]) for i, t in enumerate(convo) if t["role"] in ("user", "assistant")
    ]
    assert all(convo[i - 1]["role"] == "frames" for i, t in enumerate(convo) if t["role"] in ("user", "assistant"))
    k0, n_frames = dialogue["start_frame_idx"], dialogue["end_frame_idx"] + 1
    placement = place_turns(turns, k0, n_frames, fps=dialogue["fps"])
    assert placement.dropped == 0 and placement.clamped == 0
    starts = [k0] + [t.frame for t in placement.turns[:-1]]
    assert list(zip(starts, [t.frame for t in placement.turns])) == expected
    # The dialogue ends where ProAssist's clip ends.
    assert placement.turns[-1].frame == dialogue["end_frame_idx"]
    # An assistant turn is the response at the last frame ProAssist showed before it.
    for turn, (_, end) in zip(placement.turns, expected):
        if turn.role == "assistant":
            assert turn.point == end - 1
