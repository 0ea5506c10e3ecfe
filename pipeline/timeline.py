"""Time, frames and labels: the single implementation of docs/design.md §3. Every stage imports it.

- Frame `k` shows time `[k/fps, (k+1)/fps)`; decision point `k` comes after the model has seen frame `k`, at time
  `(k+1)/fps`.
- The stream starts at `k0 = floor(fps * video_start_time)` and ends at the last frame of the file.
- Dialogue turns follow ProAssist's cursor rule (`place_turns`): an assistant turn anchored at frame `f` is the
  response at decision point `f - 1`; a user turn anchored at `f` is input text placed just before frame `f`.
- A DST transition at time `ts` belongs to the initial state when `ts` is before the stream; otherwise it happens at
  decision point `max(k0, floor(fps * ts) - 1)`. Points past the last frame are dropped and counted.
- The ground-truth state after point `k` is the initial state plus every transition at points `<= k`; the model's
  input state when it looks at frame `k` is the state after point `k - 1`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pipeline.records import Conversation, DSTNode, RecordError, Turn, VideoRecord

DEFAULT_FPS = 2.0
NOT_STARTED, IN_PROGRESS, COMPLETED = "not_started", "in_progress", "completed"
STATE_RANK = {NOT_STARTED: 0, IN_PROGRESS: 1, COMPLETED: 2}


def frame_at(t: float, fps: float) -> int:
    """The frame showing time `t`: `floor(fps * t)`, computed exactly as ProAssist does (plain float product)."""
    return math.floor(fps * t)


def point_time(k: int, fps: float) -> float:
    """Time of decision point `k`: after frame `k` has been seen."""
    return (k + 1) / fps


def stream_start(video_start_time: float | None, fps: float) -> int:
    """`k0`, the first frame of the stream (0 when the record gives no start time)."""
    if video_start_time is None:
        return 0
    return max(0, frame_at(video_start_time, fps))


# ---------------------------------------------------------------------------------------------- dialogue turns


@dataclass(frozen=True)
class PlacedTurn:
    role: str
    content: str
    time: float
    frame: int  # f: the turn sits just before frame f
    clamped: bool  # its time was past the last frame
    shifted: bool  # the cursor rule moved it later (it was at or before the previous turn's frame)
    labels: str = ""
    progress: str = ""

    @property
    def point(self) -> int:
        """The decision point the turn belongs to: the response at `f - 1`, or the user input read at `f`."""
        return self.frame - 1 if self.role == "assistant" else self.frame


@dataclass(frozen=True)
class TurnPlacement:
    turns: tuple[PlacedTurn, ...]
    clamped: int  # kept turns whose time was past the last frame
    shifted: int  # kept turns moved later by the cursor rule
    dropped: int  # turns that could not be placed before the end (they and all later ones)


def place_turns(turns: Iterable[Turn], k0: int, n_frames: int, fps: float) -> TurnPlacement:
    """ProAssist's cursor rule: walk the turns in order with `cursor = k0`; `f = floor(fps * time)`, clamped to the
    last frame; if `f <= cursor` then `f = cursor + 1`; if that is past the last frame, this turn and all later ones
    are dropped; `cursor = f`."""
    turns = list(turns)
    last = n_frames - 1
    cursor, placed = k0, []
    clamped = shifted = 0
    for i, turn in enumerate(turns):
        f = frame_at(turn.time, fps)
        was_clamped = f > last
        if was_clamped:
            f = last
        was_shifted = f <= cursor
        if was_shifted:
            f = cursor + 1
        if f > last:
            return TurnPlacement(tuple(placed), clamped, shifted, dropped=len(turns) - i)
        clamped += was_clamped
        shifted += was_shifted
        placed.append(
            PlacedTurn(turn.role, turn.content, turn.time, f, was_clamped, was_shifted, turn.labels, turn.progress)
        )
        cursor = f
    return TurnPlacement(tuple(placed), clamped, shifted, dropped=0)


# ---------------------------------------------------------------------------------------------- DST transitions


@dataclass(frozen=True)
class DSTTimeline:
    node_ids: tuple[str, ...]
    initial: dict[str, str]  # state before the first decision point
    updates: dict[int, dict[str, str]]  # decision point -> {node id: state after that point}, changed nodes only
    dropped: int  # transitions whose point lies past the last frame

    def states(self, k0: int, n_frames: int) -> Iterator[tuple[int, dict[str, str]]]:
        """(k, state after point k) for every decision point of the stream, in order; the dict is fresh each time."""
        state = dict(self.initial)
        for k in range(k0, n_frames):
            state.update(self.updates.get(k, {}))
            yield k, dict(state)

    def state_after(self, k: int) -> dict[str, str]:
        """Ground-truth state after decision point `k` (`k < k0` gives the initial state)."""
        state = dict(self.initial)
        for point in sorted(p for p in self.updates if p <= k):
            state.update(self.updates[point])
        return state


def transition_point(ts: float, k0: int, fps: float) -> int | None:
    """Decision point of a transition at time `ts`, or None when it is part of the initial state."""
    f = frame_at(ts, fps)
    if f < k0:  # ts < k0 / fps, compared through the same float product as every other rule
        return None
    return max(k0, f - 1)


def dst_timeline(nodes: Iterable[DSTNode], k0: int, n_frames: int, fps: float) -> DSTTimeline:
    """Transitions of every node (start -> in_progress, end -> completed) grouped into one update per point."""
    nodes = list(nodes)
    initial = {n.id: NOT_STARTED for n in nodes}
    events: dict[int, dict[str, str]] = {}
    dropped = 0
    for node in nodes:
        # end_ts <= start_ts: both transitions happen at the start, so the node goes straight to completed.
        end_ts = node.end_ts if node.end_ts > node.start_ts else node.start_ts
        for ts, state in ((node.start_ts, IN_PROGRESS), (end_ts, COMPLETED)):
            point = transition_point(ts, k0, fps)
            if point is None:
                initial[node.id] = _later(initial[node.id], state)
            elif point > n_frames - 1:
                dropped += 1
            else:
                at = events.setdefault(point, {})
                at[node.id] = _later(at.get(node.id, NOT_STARTED), state)
    # Keep only real changes, so "an update at k" always means "the state after k differs from the state before".
    updates, state = {}, dict(initial)
    for point in sorted(events):
        delta = {}
        for node_id in (n.id for n in nodes):
            new = events[point].get(node_id)
            if new is not None and STATE_RANK[new] > STATE_RANK[state[node_id]]:
                delta[node_id] = new
        if delta:
            state.update(delta)
            updates[point] = delta
    return DSTTimeline(tuple(n.id for n in nodes), initial, updates, dropped)


def _later(a: str, b: str) -> str:
    return a if STATE_RANK[a] >= STATE_RANK[b] else b


# ---------------------------------------------------------------------------------------------- per-video labels


@dataclass(frozen=True)
class ConversationLabels:
    index: int  # position in the record's `conversations`
    user_type: str
    user_text: dict[int, str]  # decision point -> user text placed just before that frame
    responses: dict[int, str]  # decision point -> assistant response (speak = 1 there)
    placement: TurnPlacement
    progress: dict[int, str] = field(default_factory=dict)  # decision point -> progress summary of that response
    response_labels: dict[int, str] = field(default_factory=dict)  # decision point -> that response's labels
    empty_turns: int = 0  # assistant turns with no text: placed (they move the cursor) but not speaking labels


@dataclass(frozen=True)
class VideoLabels:
    record: VideoRecord
    fps: float
    k0: int
    n_frames: int
    dst: DSTTimeline
    conversations: tuple[ConversationLabels, ...]

    @property
    def points(self) -> range:
        return range(self.k0, self.n_frames)

    @property
    def clamped_turns(self) -> int:
        return sum(c.placement.clamped for c in self.conversations)

    @property
    def dropped_turns(self) -> int:
        return sum(c.placement.dropped for c in self.conversations)

    @property
    def shifted_turns(self) -> int:
        return sum(c.placement.shifted for c in self.conversations)

    @property
    def empty_turns(self) -> int:
        return sum(c.empty_turns for c in self.conversations)


def conversation_labels(index: int, conv: Conversation, k0: int, n_frames: int, fps: float) -> ConversationLabels:
    placement = place_turns(conv.turns, k0, n_frames, fps)
    user_text, responses, progress, response_labels, empty = {}, {}, {}, {}, 0
    for turn in placement.turns:
        # The cursor strictly increases, so no two turns share an anchor frame and no point gets two texts.
        if turn.role == "user":
            user_text[turn.point] = turn.content
        elif not turn.content.strip():
            empty += 1  # nothing to say is not a speaking label; the turn still moved the cursor, as in ProAssist
        else:
            responses[turn.point] = turn.content
            progress[turn.point] = turn.progress
            response_labels[turn.point] = turn.labels
    return ConversationLabels(index, conv.user_type, user_text, responses, placement, progress, response_labels, empty)


def video_labels(record: VideoRecord, n_frames: int, fps: float = DEFAULT_FPS) -> VideoLabels:
    """All labels of one video: the DST timeline (shared) and per-conversation turns, for points k0..n_frames-1."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    k0 = stream_start(record.video_start_time, fps)
    if n_frames <= 0:
        raise RecordError(record.video_uid, "frames file has no frames")
    if k0 > n_frames - 1:
        raise RecordError(
            record.video_uid,
            f"stream start k0={k0} (video_start_time {record.video_start_time}s) is past the last frame "
            f"({n_frames} frames)",
        )
    convs = tuple(conversation_labels(i, c, k0, n_frames, fps) for i, c in enumerate(record.conversations))
    return VideoLabels(record, fps, k0, n_frames, dst_timeline(record.nodes, k0, n_frames, fps), convs)
