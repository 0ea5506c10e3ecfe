"""DST metrics of one dataset (DESIGN section 6), pooled over its dialogues.

- Update decision P/R/F1: frames with a non-empty `pred_dst_delta` vs frames with a non-empty `ref_dst_delta`,
  matched one-to-one inside the dataset's speaking window, timing only (cost D); the most pairs, then the least D.
- Node accuracy: share of (frame, node) with `pred_state[node] == ref_state[node]`, nodes = the union of both
  states' keys (a node only one side has is wrong). Joint accuracy: share of frames with `pred_state == ref_state`.
- Transition P/R/F1: (node, new state) events of the deltas, matched one-to-one inside the window only when node
  and new state are equal (cost D).
- Validity: share of generated updates (non-empty `pred_dst_text`) that `train.sequence.parse_update` accepts
  against the predicted state before that frame: the previous frame's `pred_state`; for the first frame, the
  dialogue's `initial_state` when present, else the first `pred_state` with the nodes of its `pred_dst_delta` set
  back to `not_started`. That reconstruction is exact for validity: `pred_dst_delta` is what was applied, so a
  rejected text left the state unchanged, and a delta accepted against the true prior state is also accepted
  against `not_started` (parse_update only requires each state to move forward).

Nothing predicted and nothing expected scores 1.0 (P/R/F1, and validity with no generated update, accuracies with
no frame or node): the oracle is exactly 1.0 everywhere.
"""

from __future__ import annotations

from collections import defaultdict

from eval.metrics_speak import Counts, match, window_frames
from pipeline.timeline import NOT_STARTED
from train.sequence import parse_update


def update_counts(dialogues: list[dict]) -> Counts:
    """Pooled update-decision counts (callers may re-threshold `pred_dst_delta` and sweep)."""
    counts = Counts()
    for d in dialogues:
        l, r = window_frames(d["dataset"], d["fps"])
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


def transition_counts(dialogues: list[dict]) -> Counts:
    counts = Counts()
    for d in dialogues:
        l, r = window_frames(d["dataset"], d["fps"])
        pred, ref = _events(d["frames"], "pred_dst_delta"), _events(d["frames"], "ref_dst_delta")
        for event in pred.keys() | ref.keys():  # only equal events may match: match each kind on its own
            counts += Counts(len(match(pred.get(event, []), ref.get(event, []), l, r)),
                             len(pred.get(event, [])), len(ref.get(event, [])))
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
        before = initial_pred_state(d)
        for f in d["frames"]:
            if f["pred_dst_text"]:
                generated += 1
                valid += parse_update(f["pred_dst_text"], before) is not None
            before = f["pred_state"] or {}
    return valid, generated


def _share(right: int, total: int) -> float:
    return right / total if total else 1.0


def dst_metrics(dialogues: list[dict]) -> dict:
    up, ur, uf = update_counts(dialogues).prf()
    tp, tr, tf = transition_counts(dialogues).prf()
    node_ok, nodes, joint_ok, frames = state_counts(dialogues)
    return {"update_precision": up, "update_recall": ur, "update_f1": uf,
            "node_accuracy": _share(node_ok, nodes), "joint_accuracy": _share(joint_ok, frames),
            "transition_precision": tp, "transition_recall": tr, "transition_f1": tf,
            "validity": _share(*validity_counts(dialogues))}
