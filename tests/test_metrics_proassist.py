"""speak_proassist (ProAssist's find_match reproduced), the scoring protocol, per-intent recall, re-seeds and
summaries. Fake embedders give exact float32 cosines (axis vectors), so every count is known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from eval.intents import intents_of
from eval.metrics_dst import dst_metrics
from eval.metrics_proassist import (
    ProAssistCounts,
    distance_table,
    proassist_counts,
    proassist_dialogue,
    proassist_metrics,
    semantic_costs,
)
from eval.metrics_speak import DIST_FACTOR, speak_counts, speak_metrics, window_frames
from eval.metrics_text import MeteorScorer
from eval.protocol import ScoringError, cut_to_protocol
from eval.scoring import mean_over_datasets, score

AXES = {
    "a": (1, 0, 0, 0),
    "a!": (1, 0, 0, 0),
    "b": (0, 1, 0, 0),
    "c": (0, 0, 1, 0),
    "half": (0.5, 0.5, 0.5, 0.5),
    "p1": (1, 0, 0, 0),
    "s1": (0.5, 0.5, 0.5, 0.5),
    "p2": (0, 0, 0, 1),
}


def embed(texts):
    return np.array([AXES[t] for t in texts], dtype=np.float32)


def frames_of(n: int, preds: dict, refs: dict, labels: dict | None = None, start: int = 0) -> list[dict]:
    return [
        {
            "frame": start + k,
            "time": (start + k + 1) / 2,
            "user_text": "",
            "pred_text": preds.get(k, ""),
            "ref_text": refs.get(k, ""),
            "ref_labels": (labels or {}).get(k, ""),
            "pred_dst_delta": {},
            "ref_dst_delta": {},
            "pred_state": {},
            "ref_state": {},
            "pred_dst_text": "",
        }
        for k in range(n)
    ]


def dialogue(frames, dataset="assembly101", **extra) -> dict:
    return {
        "dataset": dataset,
        "video_uid": "v",
        "conversation": 0,
        "user_type": "talk_some",
        "fps": 2.0,
        "variant": "dst",
        "protocol": "full-video",
        "frames": frames,
        **extra,
    }


def both(frames, dataset="assembly101"):
    d = dialogue(frames, dataset)
    return speak_metrics(speak_counts([d], embed)), proassist_metrics(proassist_counts([d], embed))


def outcome(m: dict) -> tuple:
    return m["num_matched"], m["num_mismatched"], m["num_redundant"], m["num_missed"]


@pytest.fixture(scope="module")
def no_meteor():
    with MeteorScorer(factory=lambda: (_ for _ in ()).throw(OSError("not needed here"))) as scorer:
        yield scorer


# ----------------------------------------------------------------------------------------------- the quirk


def test_verbatim_copy_on_its_own_frame_is_dropped():
    """Cost exactly 0 on its own frame: ProAssist loses that edge; the copy lands on a silent neighbour."""
    labels = {10: "initiative|instruction,feedback"}
    speak, pro = both(frames_of(20, {10: "a"}, {10: "a"}, labels))
    assert outcome(speak) == (1, 0, 0, 0) and speak["f1"] == 1.0
    assert outcome(pro) == (0, 0, 1, 1) and (pro["precision"], pro["recall"], pro["f1"]) == (0.0, 0.0, 0.0)
    assert (pro["exact_copies"], pro["zero_cost_dropped"], pro["no_full_matching"]) == (1, 1, 0)
    assert speak["intent_recall"]["instruction"] == {"recall": 1.0, "num_ref": 1, "num_matched": 1}
    assert pro["intent_recall"]["feedback"] == {"recall": 0.0, "num_ref": 1, "num_matched": 0}
    assert pro["intent_recall"]["responsive"]["recall"] is None


def test_identical_embeddings_are_dropped_without_being_copies():
    # "a!" embeds exactly like "a": cost 0 again, though the texts differ
    _, pro = both(frames_of(20, {10: "a!"}, {10: "a"}))
    assert outcome(pro) == (0, 0, 1, 1) and (pro["exact_copies"], pro["zero_cost_dropped"]) == (0, 1)


def test_neighbouring_copies_swap_and_stay_true_positives():
    # both own-frame edges are dropped; the two predictions take each other's reference one frame away
    speak, pro = both(frames_of(12, {2: "a", 3: "a"}, {2: "a", 3: "a"}))
    assert outcome(speak) == outcome(pro) == (2, 0, 0, 0)
    assert pro["time_diff_s"] == 0.5 and speak["time_diff_s"] == 0.0 and pro["zero_cost_dropped"] == 2


def test_oracle_by_hand():
    """An oracle (every prediction a copy) under ProAssist's matching: the adjacent pair swaps (2 TP), the
    isolated one becomes redundant and its reference missed. P = R = F1 = 2/3, while `speak` gives 1.0."""
    f = frames_of(12, {2: "a", 3: "a", 9: "b"}, {2: "a", 3: "a", 9: "b"})
    speak, pro = both(f)
    assert speak["f1"] == 1.0
    assert outcome(pro) == (2, 0, 1, 1) and pro["precision"] == pro["recall"] == pro["f1"] == 2 / 3
    assert (pro["exact_copies"], pro["zero_cost_dropped"]) == (3, 3)
    cut = cut_to_protocol([dialogue(f)], "proassist")[0]  # frames 0..9: the same outcome
    assert len(cut["frames"]) == 10
    assert outcome(proassist_metrics(proassist_counts([cut], embed))) == (2, 0, 1, 1)


def test_no_full_matching_is_counted_not_raised():
    # one frame, a verbatim copy: no edge left at all (ProAssist's scipy call raises "no full matching exists")
    speak, pro = both(frames_of(1, {0: "a"}, {0: "a"}))
    assert outcome(speak) == (1, 0, 0, 0)
    assert outcome(pro) == (0, 0, 1, 1) and pro["no_full_matching"] == 1 and pro["num_pred"] == 1


def test_empty_and_silent_dialogues():
    c = ProAssistCounts()
    proassist_dialogue([], -4, 8, 2.0, embed, c)  # ProAssist's torch.range(1, 0) raises here
    proassist_dialogue(frames_of(5, {}, {1: "a"}), -4, 8, 2.0, embed, c)
    proassist_dialogue(frames_of(5, {1: "a"}, {}), -4, 8, 2.0, embed, c)
    assert (c.num_pred, c.num_ref, c.num_missed, c.num_redundant, c.no_full_matching) == (1, 1, 1, 1, 0)


@pytest.mark.parametrize("offset,matched", [(-4, True), (8, True), (-5, False), (9, False), (1, True)])
def test_window_edges(offset, matched):
    _, pro = both(frames_of(40, {20: "a"}, {20 + offset: "a"}))
    assert outcome(pro) == ((1, 0, 0, 0) if matched else (0, 0, 1, 1))


def test_threshold_and_mismatch():
    # |cos| exactly 0.5: semantic score 0.5 is not > 0.5, a mismatch in both scores; cos 0 likewise
    speak, pro = both(frames_of(20, {10: "a", 15: "b"}, {10: "half", 15: "c"}))
    assert outcome(speak) == outcome(pro) == (0, 2, 0, 0)
    assert sorted(proassist_counts([dialogue(frames_of(20, {10: "a"}, {10: "half"}))], embed).matched_scores) == [0.5]


def test_float32_arithmetic_matches_torch():
    # their distance: float32 d ** 1.5 * (0.3 / rg ** 1.5) in torch; rg = 8 for assembly101 at 2 fps
    table = distance_table(8, 9)
    assert table.dtype == np.float32 and table[0] == 0
    assert table[8] == np.float32(np.float32(8**1.5) * np.float32(DIST_FACTOR / 8**1.5))
    assert window_frames("assembly101", 2.0) == (-4, 8)
    costs = semantic_costs(embed, [("a", "a"), ("a", "half"), ("b", "c")])
    assert costs.dtype == np.float32 and costs.tolist() == [0.0, 0.5, 1.0]
    assert semantic_costs(embed, []).shape == (0,)


# ----------------------------------------------------------------------------------------------- intents


@pytest.mark.parametrize(
    "labels,intents",
    [
        ("initiative|instruction", ("instruction",)),
        ("initiative|instruction,feedback", ("instruction", "feedback")),
        ("initiative|feedback,info_sharing", ("feedback",)),
        ("responsive|instruction,info_sharing", ("responsive",)),
        ("initiative|correction", ("other",)),
        ("", ("other",)),
        (None, ("other",)),
        ("instruction", ("other",)),
    ],
)
def test_intents_of(labels, intents):
    assert intents_of(labels) == intents


def test_intent_recall_mean_is_over_datasets_that_have_the_intent(no_meteor):
    d1 = dialogue(frames_of(20, {5: "a"}, {5: "b", 12: "c"}, {5: "responsive|x", 12: "initiative|instruction"}), "wtag")
    d2 = dialogue(frames_of(20, {5: "c"}, {5: "c"}, {5: "initiative|instruction"}), "ego4d")
    m = score([d1, d2], embed, "stub", meteor=no_meteor, protocol="full-video")
    wtag, ego = (m["datasets"][k]["speak"]["intent_recall"] for k in ("wtag", "ego4d"))
    assert wtag["responsive"] == {"recall": 0.0, "num_ref": 1, "num_matched": 0}
    assert ego["responsive"]["recall"] is None
    mean = m["mean"]["speak"]["intent_recall"]
    assert mean["responsive"]["recall"] == 0.0  # wtag only, not (0 + null) / 2
    assert mean["instruction"]["recall"] == 0.5 and mean["instruction"]["num_ref"] == 1.0
    assert mean["feedback"]["recall"] is None
    assert m["mean"]["speak_proassist"]["intent_recall"]["instruction"]["recall"] == 0.0  # ego4d's copy dropped


def test_mean_of_a_missing_value_is_null_except_where_averaged_over_available():
    per = {
        "x": {"dst_never": None, "summary_similarity": 0.4},
        "y": {"dst_never": {"joint_accuracy": 1.0}, "summary_similarity": None},
    }
    assert mean_over_datasets(per) == {"dst_never": None, "summary_similarity": 0.4}


# ----------------------------------------------------------------------------------------------- protocol


def protocol_dialogue(**extra) -> dict:
    f = frames_of(20, {4: "a", 15: "b"}, {4: "a", 8: "b"}, start=100)
    f[17]["pred_dst_delta"] = {"S1": "completed"}  # an update after the last assistant turn
    return dialogue(f, **extra)


def test_proassist_protocol_cuts_after_the_last_reference(no_meteor):
    d = protocol_dialogue(
        reseeds=[
            {"frame": 103, "row": 3, "strategy": "dst-reseed", "ref_progress": ""},
            {"frame": 112, "row": 12, "strategy": "dst-reseed", "ref_progress": ""},
        ]
    )
    silent = dialogue(frames_of(10, {3: "a"}, {}), "wtag")
    pro = score([d, silent], embed, "stub", meteor=no_meteor, protocol="proassist")
    full = score([d, silent], embed, "stub", meteor=no_meteor, protocol="full-video")
    assert (pro["protocol"], full["protocol"]) == ("proassist", "full-video")
    assert pro["dialogues_without_reference"] == full["dialogues_without_reference"] == 1
    # proassist: frames 100..108; the prediction at 115 and the update at 117 are not scored, nor wtag's 10 frames
    assert pro["datasets"]["assembly101"]["speak"]["num_pred"] == 1
    assert full["datasets"]["assembly101"]["speak"]["num_pred"] == 2
    assert pro["datasets"]["assembly101"]["dst"]["update_precision"] == 1.0  # nothing predicted, nothing expected
    assert full["datasets"]["assembly101"]["dst"]["update_precision"] == 0.0
    assert pro["datasets"]["wtag"]["speak"]["num_pred"] == 0 and full["datasets"]["wtag"]["speak"]["num_pred"] == 1
    assert pro["reseeds"] == {"total": 1, "datasets": {"assembly101": 1, "wtag": 0}}
    assert full["reseeds"]["total"] == 2
    assert len(d["frames"]) == 20  # the records themselves are not modified


def test_full_video_refuses_dialogues_streamed_under_proassist(no_meteor):
    with pytest.raises(ScoringError, match="streamed under the proassist protocol"):
        score([protocol_dialogue(protocol="proassist")], embed, "stub", meteor=no_meteor, protocol="full-video")
    with pytest.raises(ScoringError, match="protocol must be one of"):
        score([protocol_dialogue()], embed, "stub", meteor=no_meteor, protocol="whole")
    m = score([protocol_dialogue(protocol="proassist")], embed, "stub", meteor=no_meteor)  # the default
    assert m["protocol"] == "proassist"


# ----------------------------------------------------------------------------------------------- variants


def test_summary_variant_similarity_and_mixed_variants(no_meteor):
    reseeds = [
        {"frame": 2, "row": 2, "strategy": "summary", "summary": "s1", "ref_progress": "p1"},  # |cos| 0.5
        {"frame": 5, "row": 5, "strategy": "summary", "summary": "", "ref_progress": "p2"},  # empty: 0
        {"frame": 6, "row": 6, "strategy": "summary", "summary": "s1", "ref_progress": ""},
    ]  # not counted
    d = dialogue(frames_of(12, {}, {11: "a"}), variant="summary", reseeds=reseeds)
    other = dialogue(frames_of(12, {}, {11: "a"}), "wtag", variant="summary")
    m = score([d, other], embed, "stub", meteor=no_meteor)
    assert m["variant"] == "summary" and m["reseeds"] == {"total": 3, "datasets": {"assembly101": 3, "wtag": 0}}
    assert m["datasets"]["assembly101"]["summary_similarity"] == 0.25
    assert m["datasets"]["wtag"]["summary_similarity"] is None and m["mean"]["summary_similarity"] == 0.25
    # no DST in this variant: every DST number null, same keys
    assert set(m["mean"]["dst"]) == set(m["mean"]["dst_never"]) == set(dst_metrics([d]))
    assert set(m["mean"]["dst"].values()) == set(m["datasets"]["wtag"]["dst_never"].values()) == {None}
    dst = score([dialogue(frames_of(4, {}, {3: "a"}))], embed, "stub", meteor=no_meteor)
    assert dst["variant"] == "dst" and dst["mean"]["summary_similarity"] is None  # old records: no variant
    with pytest.raises(ScoringError, match="mix variants"):
        score([d, dialogue(frames_of(4, {}, {}), variant="none")], embed, "stub", meteor=no_meteor)
