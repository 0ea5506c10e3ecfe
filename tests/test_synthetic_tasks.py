"""Synthetic task videos: real formats, labels without clamping, and the learnability rules (docs/design.md §3)."""

from __future__ import annotations

import base64
import io
import itertools
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.frames_files import count_frames, find_frames_file, open_frames_stream
from pipeline.records import parse_record
from pipeline.timeline import COMPLETED, IN_PROGRESS, transition_point, video_labels
from synthetic import tasks as st

SIZES = (3, 2, 2)
FPS = 2.0
# Mean absolute pixel difference (0-255) of consecutive decoded frames: a step change must exceed CHANGE_MIN; frames
# without an update differ by noise, the distractor, the progress bar and rare flicker, on average below STILL_MEAN.
CHANGE_MIN, STILL_MEAN = 30.0, 8.0


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, st.generate(out, *SIZES, seed=0, fps=FPS)


def _videos(out):
    """(split, raw record, parsed record, labels, frames path) of every video."""
    for split, path in st.splits(out).items():
        for i, raw in enumerate(json.loads(path.read_text())):
            record = parse_record(raw, i)
            frames = find_frames_file(st.frames_root(out), record.dataset, record.video_uid)
            yield split, raw, record, video_labels(record, count_frames(frames), FPS), frames


def _pixels(path):
    rows = open_frames_stream(path).read_all().column("frame").to_pylist()
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(r))).convert("RGB"), dtype=np.float32) for r in rows]


def test_summary_and_record_format(synth):
    out, summary = synth
    assert [summary["splits"][s]["videos"] for s in st.SPLITS] == list(SIZES)
    datasets = set()
    for _split, raw, record, labels, _ in _videos(out):
        datasets.add(record.dataset)
        assert set(raw) >= {
            "video_uid",
            "inferred_goal",
            "inferred_knowledge",
            "video_labels",
            "parsed_video_anns",
            "conversations",
            "dst",
        }
        assert raw["inferred_knowledge"].splitlines()[1].startswith("1. ")
        assert [c["user_type"] for c in raw["conversations"]] == list(st.USER_TYPES)
        for turn in (t for c in raw["conversations"] for t in c["conversation"]):
            assert ("progress" in turn) == (turn["role"] == "assistant") and "labels" in turn
        # The frames file covers time 0 to start + duration, on frame boundaries.
        anns = raw["parsed_video_anns"]
        assert labels.n_frames == round(FPS * (anns["video_start_time"] + anns["duration"]))
        assert labels.k0 == round(FPS * anns["video_start_time"])
        assert 40 <= labels.n_frames <= 130
    assert datasets == set(st.DATASETS)
    assert sum(v["frames"] for v in summary["splits"].values()) == sum(count_frames(p) for *_, p in _videos(out))


def test_labels_have_nothing_clamped_shifted_or_dropped(synth):
    for _, _, record, labels, _ in _videos(synth[0]):
        assert labels.clamped_turns == labels.shifted_turns == labels.dropped_turns == labels.dst.dropped == 0
        # Every start and end is its own transition inside the stream; the video ends with every step completed.
        assert all(transition_point(n.start_ts, labels.k0, FPS) > labels.k0 for n in record.nodes)
        assert labels.dst.initial == {n.id: "not_started" for n in record.nodes}
        assert set(labels.dst.state_after(labels.n_frames - 1).values()) == {COMPLETED}


def test_update_frames_change_and_still_frames_do_not(synth):
    change, still = [], []
    for *_, labels, path in _videos(synth[0]):
        frames = _pixels(path)
        for k in range(labels.k0 + 1, labels.n_frames):
            diff = float(np.abs(frames[k] - frames[k - 1]).mean())
            (change if k in labels.dst.updates else still).append(diff)
    assert change and min(change) > CHANGE_MIN, min(change)
    assert np.mean(still) < STILL_MEAN, np.mean(still)
    assert min(change) > 2 * np.percentile(still, 99)


def test_step_looks_are_distinct_and_consistent():
    for dataset, (*_, tasks) in st.DATASETS.items():
        for task, (_, steps) in enumerate(tasks):
            looks = [None, *range(len(steps))]  # idle too: it must look like no step
            for a, b in itertools.combinations(looks, 2):
                one, two = (st.render_frame(dataset, task, s, 0.5).astype(float) for s in (a, b))
                assert np.abs(one - two).mean() > 40, (dataset, task, a, b)
            # The same step in two videos (other noise, distractor, progress) stays close.
            one = st.render_frame(dataset, task, 1, 0.2, rng=np.random.default_rng(1), distractor=(0.1, 0.2, 255.0))
            two = st.render_frame(dataset, task, 1, 0.9, rng=np.random.default_rng(2), distractor=(0.6, 0.5, 0.0))
            assert np.abs(one.astype(float) - two).mean() < 12


def test_assistant_speaks_at_update_points(synth):
    for _, raw, record, labels, _ in _videos(synth[0]):
        updates = labels.dst.updates
        for conv in labels.conversations:
            for node in record.nodes:  # the instruction of a step is said at its start's update point
                point = transition_point(node.start_ts, labels.k0, FPS)
                assert updates[point][node.id] == IN_PROGRESS and node.name in conv.responses[point]
            raw_turns = raw["conversations"][conv.index]["conversation"]  # nothing dropped: same order
            for turn, label in zip(conv.placement.turns, (t["labels"] for t in raw_turns)):
                if label.startswith("initiative"):  # only at update points; feedback only where a step completes
                    assert turn.point in updates
                    if "feedback" in label:
                        assert COMPLETED in updates[turn.point].values()
            last = max(updates)
            assert "all steps are done" in conv.responses[last]


def test_answers_follow_questions_and_match_state(synth):
    counts = {u: [] for u in st.USER_TYPES}
    for _, _, record, labels, _ in _videos(synth[0]):
        names = {n.id: (i + 1, n.name) for i, n in enumerate(record.nodes)}
        for conv in labels.conversations:
            turns = conv.placement.turns
            assert turns[0].role == "user" and turns[0].content.startswith("I want to")
            questions = [i for i, t in enumerate(turns) if t.role == "user"][1:]
            counts[conv.user_type].append(len(questions))
            for i in questions:
                q, a = turns[i], turns[i + 1]
                # The answer is the response at the point right after the question's frame.
                assert a.role == "assistant" and a.point == q.frame
                assert all(abs(q.frame - u) >= 2 for u in labels.dst.updates)  # away from step changes
                state = labels.dst.state_after(q.frame)
                if q.content == "What step am I on?":
                    current = [names[n] for n, s in state.items() if s == IN_PROGRESS]
                    if current:
                        assert a.content == f"You are on step {current[0][0]}: {current[0][1]}."
                    else:
                        assert a.content.endswith("steps are done.")
                elif q.content == "How many steps are left?":
                    left = sum(s != COMPLETED for s in state.values())
                    assert a.content == f"Steps left: {left} of {len(state)}."
    for user_type, (lo, hi) in st.QUESTIONS_PER_TYPE.items():
        assert all(lo <= c <= hi for c in counts[user_type]), (user_type, counts[user_type])


def test_splits_disjoint_and_deterministic(synth, tmp_path):
    out, summary = synth
    uids = {
        s: {json.loads(p.read_text())[i]["video_uid"] for i in range(n)}
        for (s, p), n in zip(st.splits(out).items(), SIZES)
    }
    assert sum(map(len, uids.values())) == len(set().union(*uids.values())) == sum(SIZES)
    again = st.generate(tmp_path, *SIZES, seed=0, fps=FPS)
    assert again["splits"].keys() == summary["splits"].keys()
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert all((out / f).read_bytes() == (tmp_path / f).read_bytes() for f in files)
    other = st.generate(tmp_path / "seed1", 1, 0, 0, seed=1, fps=FPS)
    assert other["splits"]["train"]["frames"] > 0
    assert st.splits(tmp_path / "seed1")["train"].read_bytes() != st.splits(out)["train"].read_bytes()
