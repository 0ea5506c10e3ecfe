"""Properties of the label rules over random records (hypothesis)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.labels import label_columns
from pipeline.records import Conversation, DSTNode, Turn, VideoRecord
from pipeline.timeline import STATE_RANK, frame_at, video_labels

times = st.integers(min_value=0, max_value=400).map(lambda x: x / 10)  # 0.0 .. 40.0 s, one decimal like the data


@st.composite
def records(draw):
    n_nodes = draw(st.integers(1, 6))
    nodes = tuple(DSTNode(f"S{i + 1}", f"step {i}", draw(times), draw(times)) for i in range(n_nodes))
    convs = tuple(
        Conversation(
            "talk_some",
            tuple(
                Turn(draw(st.sampled_from(["user", "assistant"])), draw(times), f"t{c}.{j}")
                for j in range(draw(st.integers(0, 12)))
            ),
        )
        for c in range(draw(st.integers(1, 3)))
    )
    record = VideoRecord("vid", "ego4d", "g", "k", draw(times), nodes, convs)
    fps = draw(st.sampled_from([1.0, 2.0, 2.0, 3.0]))
    k0 = frame_at(record.video_start_time, fps)
    n_frames = draw(st.integers(k0 + 1, k0 + 90))
    return record, fps, n_frames


def oracle_state(record, fps, k0, n_frames, k):
    """The state after point k straight from the wording of docs/design.md §3, one node at a time."""

    def happened(ts):  # before the stream: initial; else at max(k0, floor(fps*ts)-1) if that is not past the end
        f = frame_at(ts, fps)
        point = -1 if f < k0 else max(k0, f - 1)
        return point <= n_frames - 1 and point <= k

    state = {}
    for n in record.nodes:
        end = n.end_ts if n.end_ts > n.start_ts else n.start_ts
        state[n.id] = "completed" if happened(end) else "in_progress" if happened(n.start_ts) else "not_started"
    return state


@settings(max_examples=300, deadline=None)
@given(records())
def test_dst_labels(sample):
    record, fps, n_frames = sample
    labels = video_labels(record, n_frames, fps)
    cols = label_columns(labels)
    n = n_frames - labels.k0
    states = [json.loads(s) for s in cols["dst_state"][:n]]
    previous = dict(labels.dst.initial)
    assert previous == oracle_state(record, fps, labels.k0, n_frames, labels.k0 - 1)
    for i, k in enumerate(labels.points):
        state = states[i]
        assert state == oracle_state(record, fps, labels.k0, n_frames, k)
        # never backwards
        assert all(STATE_RANK[state[node]] >= STATE_RANK[previous[node]] for node in state)
        # an update exactly where the state changed, listing exactly the changed nodes
        changed = {node: s for node, s in state.items() if s != previous[node]}
        assert cols["dst_update"][i] == bool(changed)
        assert (json.loads(cols["dst_delta"][i]) if cols["dst_delta"][i] else {}) == changed
        previous = state


@settings(max_examples=300, deadline=None)
@given(records())
def test_speak_labels(sample):
    record, fps, n_frames = sample
    labels = video_labels(record, n_frames, fps)
    cols = label_columns(labels)
    n = n_frames - labels.k0
    for c, conv in enumerate(labels.conversations):
        rows = slice(c * n, (c + 1) * n)
        kept = conv.placement.turns
        # kept turns are a prefix of the conversation; the rest is dropped
        assert len(kept) + conv.placement.dropped == len(record.conversations[c].turns)
        assert [t.content for t in kept] == [t.content for t in record.conversations[c].turns[: len(kept)]]
        frames = [t.frame for t in kept]
        assert frames == sorted(set(frames)) and all(labels.k0 < f < n_frames for f in frames)
        assistant = [t for t in kept if t.role == "assistant"]
        # one speak per kept assistant turn, never two on one point, responses in order
        assert sum(cols["speak"][rows]) == len(assistant) == len({t.point for t in assistant})
        assert [r for r in cols["response"][rows] if r] == [t.content for t in assistant]
        assert [u for u in cols["user_text"][rows] if u] == [t.content for t in kept if t.role == "user"]
        assert all(s == (r != "") for s, r in zip(cols["speak"][rows], cols["response"][rows]))
