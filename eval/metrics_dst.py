"""DST metrics of one dataset (docs/design.md §8), pooled over its dialogues.

- Update decision P/R/F1: frames with a non-empty `pred_dst_delta` vs frames with a non-empty `ref_dst_delta`,
  matched one-to-one inside a symmetric window of `dst_window_s` seconds each side (default 2.0; `int(s * fps)`
  frames), timing only (cost D); the most pairs, then the least D. Not the speaking windows (docs/design.md §8): those
  allow early speech, but an early "completed" is a state-tracking error.
- Node accuracy: share of (frame, node) with `pred_state[node] == ref_state[node]`, nodes = the union of both
  states' keys (a node only one side has is wrong). Joint accuracy: share of frames with `pred_state == ref_state`.
- Transition P/R/F1: (node, new state) events of the deltas, matched one-to-one inside the same symmetric window
  only when node and new state are equal (cost D).
- Validity: share of generated updates (non-empty `pred_dst_text`) that `train.sequence.parse_update` accepts
  against the state the update was generated from: the frame's `state_before` when the record has it
  (teacher-forced: the ground-truth state, not the previous predicted one), else the predicted state before that
  frame: the previous frame's `pred_state`; for the first frame, the dialogue's `initial_state` when present, else
  the first `pred_state` with the nodes of its `pred_dst_delta` set back to `not_started`. That reconstruction is
  exact for validity: `pred_dst_delta` is what was applied, so a rejected text left the state unchanged, and a
  delta accepted against the true prior state is also accepted against `not_started` (parse_update only requires
  each state to move forward).

`never_update_metrics`: the same metrics for the never-update predictor on the same references (no update, the
state stays the dialogue's `initial_state`), the floor every DST number must be read against.

Nothing predicted and nothing expected scores 1.0 (P/R/F1, and validity with no generated update, accuracies with
no frame or node): the oracle is exactly 1.0 everywhere.
"""

from __future__ import annotations

from collections import defaultdict

from eval.config import DST_WINDOW_S
from eval.metrics_speak import Counts, match
from pipeline.timeline import NOT_STARTED
from train.sequence import parse_update

DST_KEYS = (
    "update_precision",
    "update_recall",
    "update_f1",
    "node_accuracy",
    "joint_accuracy",
    "transition_precision",
    "transition_recall",
    "transition_f1",
    "validity",
)


def dst_window_frames(dst_window_s: float, fps: float) -> tuple[int, int]:
    """`(l, r)` = `(-w, w)` with `w = int(dst_window_s * fps)` frames."""
    w = int(dst_window_s * fps)
    return -w, w


def update_counts(dialogues: list[dict], dst_window_s: float = DST_WINDOW_S) -> Counts:
    """Pooled update-decision counts (callers may re-threshold `pred_dst_delta` and sweep)."""
    counts = Counts()
    for d in dialogues:
        l, r = dst_window_frames(dst_window_s, d["fps"])
        pred = [f["frame"] for f in d["frames"] if f["pred_dst_delta"]]
        ref = [f["frame"] for f in d["frames"] if f["ref_dst_delta"]]
        counts += Counts(len(match(pred, ref, l, r)), len(pred), len(ref))
    return counts


def _events(frames: list[dict], key: str) -> dict[tuple[str, str], list[int]]:
    """Frames of each (node, new state) event."""
    events: dict[tuple[str, str], list[int]] = defaultdict(list)
    for f in frames:
        for node, state in (f[key] or {}).items():
            events[(node, state)].append(f["frame"])
    return events


def transition_counts(dialogues: list[dict], dst_window_s: float = DST_WINDOW_S) -> Counts:
    counts = Counts()
    for d in dialogues:
        l, r = dst_window_frames(dst_window_s, d["fps"])
        pred, ref = _events(d["frames"], "pred_dst_delta"), _events(d["frames"], "ref_dst_delta")
        for event in pred.keys() | ref.keys():  # only equal events may match: match each kind on its own
            counts += Counts(
                len(match(pred.get(event, []), ref.get(event, []), l, r)),
                len(pred.get(event, [])),
                len(ref.get(event, [])),
            )
    return counts


def state_counts(dialogues: list[dict]) -> tuple[int, int, int, int]:
    """(nodes right, nodes, frames fully right, frames)."""
    node_ok = nodes = joint_ok = frames = 0
    for d in dialogues:
        for f in d["frames"]:
            pred, ref = f["pred_state"] or {}, f["ref_state"] or {}
            keys = pred.keys() | ref.keys()
            node_ok += sum(pred.get(k) == ref.get(k) for k in keys)
            nodes += len(keys)
            joint_ok += pred == ref
            frames += 1
    return node_ok, nodes, joint_ok, frames


def initial_pred_state(dialogue: dict) -> dict[str, str]:
    """The predicted state before the dialogue's first frame (see the module docstring)."""
    if dialogue.get("initial_state") is not None:
        return dict(dialogue["initial_state"])
    first = dialogue["frames"][0]
    return {**(first["pred_state"] or {}), **{node: NOT_STARTED for node in first["pred_dst_delta"] or {}}}


def validity_counts(dialogues: list[dict]) -> tuple[int, int]:
    """(valid generated updates, generated updates)."""
    valid = generated = 0
    for d in dialogues:
        if not d["frames"]:
            continue
        predicted = initial_pred_state(d)
        for f in d["frames"]:
            if f.get("pred_dst_text"):
                generated += 1
                source = f["state_before"] if f.get("state_before") is not None else predicted
                valid += parse_update(f["pred_dst_text"], source) is not None
            predicted = f["pred_state"] or {}
    return valid, generated


def _share(right: int, total: int) -> float:
    return right / total if total else 1.0


def dst_metrics(dialogues: list[dict], dst_window_s: float = DST_WINDOW_S) -> dict:
    up, ur, uf = update_counts(dialogues, dst_window_s).prf()
    tp, tr, tf = transition_counts(dialogues, dst_window_s).prf()
    node_ok, nodes, joint_ok, frames = state_counts(dialogues)
    values = (
        up,
        ur,
        uf,
        _share(node_ok, nodes),
        _share(joint_ok, frames),
        tp,
        tr,
        tf,
        _share(*validity_counts(dialogues)),
    )
    return dict(zip(DST_KEYS, values))


def never_update(dialogue: dict) -> dict:
    """The dialogue as the never-update predictor would have it: no update, the state stays `initial_state`."""
    initial = dialogue["initial_state"]
    frames = [
        {**f, "pred_dst_delta": {}, "pred_dst_text": "", "pred_state": dict(initial), "state_before": None}
        for f in dialogue["frames"]
    ]
    return {**dialogue, "frames": frames}


def never_update_metrics(dialogues: list[dict], dst_window_s: float = DST_WINDOW_S) -> dict | None:
    """`dst_metrics` of the never-update predictor on the same references; None when a dialogue lacks
    `initial_state` (old predictions files: the state at the stream start cannot be recovered from the frames)."""
    if any(d.get("initial_state") is None for d in dialogues):
        return None
    return dst_metrics([never_update(d) for d in dialogues], dst_window_s)
