"""ProAssist's speaking metrics (docs/design.md §8), and the window matching that the DST metrics reuse.

A prediction at frame `i` may match frame `j` only if `l <= j - i <= r` (`[l, r]` = the dataset's window in seconds
x fps, `int()`-truncated). Cost = `C + D`: `C = 1 - |cos(e(g_i), e(r_j))|` for a non-empty reference, 1 for a
silent frame; `D = 0.3 * (|i - j| / rg) ** 1.5`, `rg = max(|l|, r)`. Every prediction is matched one-to-one
(min-cost) to a frame of its dialogue; matched to a reference with `|cos| > 0.5` = TP, `<= 0.5` = mismatched, to a
silent frame = redundant; a reference no prediction reached = missed. Counts pool over the dialogues of a dataset.

Zero divisions follow ProAssist (0.0), with one exception: nothing predicted and nothing to predict scores 1.0
(P = R = F1 = jaccard), so the oracle is exactly 1.0 on every dataset, even one without references.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from eval.intents import intent_recall, intents_of, memory_of

# ProAssist's get_match_time_window, in its lookup order (a name matches by substring, e.g. "ego4d/dialog_val").
SPEAK_WINDOWS_S = {
    "ego4d": (-4.0, 8.5),
    "epickitchens": (-1.5, 3.0),
    "holoassist": (-1.5, 2.5),
    "egoexolearn": (-2.0, 3.5),
    "assembly101": (-2.0, 4.0),
    "wtag": (-3.0, 6.0),
}
DEFAULT_WINDOW_S = (-2.5, 2.5)
DIST_FACTOR, DIST_POWER = 0.3, 1.5
MATCH_THRESHOLD = 0.5  # TP when |cos| > this; semantic_score averages |cos| >= this (ProAssist's two comparisons)
# Added to every feasible edge: scipy's sparse matching treats an explicit 0 as a missing edge, and an exact-zero
# cost is real (same frame, C = 0: the oracle; timing-only matching at the same frame). Every matching with the
# same number of real edges gains the same constant, so the argmin is unchanged.
EDGE_OFFSET = 1.0

Embed = Callable[[list[str]], np.ndarray]


def window_seconds(dataset: str) -> tuple[float, float]:
    if "narration" not in dataset:
        for name, window in SPEAK_WINDOWS_S.items():
            if name in dataset:
                return window
    return DEFAULT_WINDOW_S


def window_frames(dataset: str, fps: float) -> tuple[int, int]:
    """`(l, r)` in frames: seconds x fps, `int()`-truncated like ProAssist."""
    left, right = window_seconds(dataset)
    return int(left * fps), int(right * fps)


def distance_cost(i: int, j: int, rg: int) -> float:
    return DIST_FACTOR * (abs(i - j) / rg) ** DIST_POWER if rg else 0.0


def match(
    pred_frames: Sequence[int],
    target_frames: Sequence[int],
    l: int,
    r: int,
    content_cost: Callable[[int, int], float] | None = None,
) -> list[tuple[int, int]]:
    """Min-cost one-to-one matching of predictions (frames `pred_frames`) to targets (frames `target_frames`),
    pair `(p, t)` feasible only if `l <= target_frames[t] - pred_frames[p] <= r`, cost
    `content_cost(p, t) + D` (content 0 when None: timing-only). Among the matchings with the most pairs, the
    cheapest; returns `(p, t)` index pairs sorted by `p`. Speaking metrics pass every frame of the dialogue as a
    target, so each prediction can take its own frame and every prediction is matched, exactly as in ProAssist."""
    n, m = len(pred_frames), len(target_frames)
    rg = max(abs(l), r)
    order = sorted(range(m), key=target_frames.__getitem__)
    sorted_frames = [target_frames[t] for t in order]
    rows, cols, costs = [], [], []
    for p, i in enumerate(pred_frames):
        for t in order[bisect_left(sorted_frames, i + l) : bisect_right(sorted_frames, i + r)]:
            rows.append(p)
            cols.append(t)
            costs.append(distance_cost(i, target_frames[t], rg) + (content_cost(p, t) if content_cost else 0.0))
    if not rows:
        return []
    data = np.asarray(costs, dtype=np.float64) + EDGE_OFFSET
    # One private dummy target per prediction keeps a full matching possible when some prediction has no feasible
    # target. Its cost exceeds any total of real edges, so a matching with fewer dummies always wins: the most pairs
    # first, then the least cost (unused whenever a full real matching exists, as for speaking).
    big = n * float(data.max()) + 1.0
    graph = csr_matrix(
        (
            np.concatenate([data, np.full(n, big)]),
            (np.concatenate([rows, np.arange(n)]), np.concatenate([cols, m + np.arange(n)])),
        ),
        shape=(n, m + n),
    )
    row_ind, col_ind = min_weight_full_bipartite_matching(graph)
    return sorted((int(p), int(t)) for p, t in zip(row_ind, col_ind) if t < m)


def prf(tp: int, num_pred: int, num_ref: int) -> tuple[float, float, float]:
    """Precision, recall, F1; 0.0 on a zero division, 1.0 for all three when nothing was predicted or expected."""
    if num_pred == 0 and num_ref == 0:
        return 1.0, 1.0, 1.0
    p = tp / num_pred if num_pred else 0.0
    r = tp / num_ref if num_ref else 0.0
    return p, r, (2 * p * r / (p + r) if p + r > 0 else 0.0)


@dataclass
class Counts:
    """Pooled counts of a one-to-one detection match."""

    tp: int = 0
    num_pred: int = 0
    num_ref: int = 0

    def __iadd__(self, other: Counts) -> Counts:
        self.tp, self.num_pred, self.num_ref = (
            self.tp + other.tp,
            self.num_pred + other.num_pred,
            self.num_ref + other.num_ref,
        )
        return self

    def prf(self) -> tuple[float, float, float]:
        return prf(self.tp, self.num_pred, self.num_ref)


def to_numpy(vectors) -> np.ndarray:
    """An embedder's output (numpy, a list, or a torch tensor on any device) as a numpy array."""
    if hasattr(vectors, "detach"):
        vectors = vectors.detach().cpu().numpy()
    return np.asarray(vectors)


class EmbeddingCache:
    """Unit-normalised embeddings, each distinct text computed once, kept for the cache's lifetime (a threshold
    sweep re-scores the same texts). Wraps `embed(list[str]) -> [n, d]` (the model's raw output: numpy or a torch
    tensor) and is itself such a callable. `raw` passes a list through `embed` uncached, in one call, for
    `speak_proassist`, which must see exactly the float32 vectors ProAssist's own batching gives."""

    def __init__(self, embed: Embed):
        self.embed = embed
        self.vectors: dict[str, np.ndarray] = {}

    def raw(self, texts: list[str]):
        return self.embed(list(texts))

    def add(self, texts) -> None:
        new = sorted({t for t in texts if t and t not in self.vectors})
        if not new:
            return
        vectors = to_numpy(self.embed(new)).astype(np.float64)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.where(norms > 0, norms, 1.0)  # a zero vector stays zero: cos 0
        self.vectors.update(zip(new, vectors.astype(np.float32)))  # float32 like ProAssist's; half the memory

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.add(texts)
        return np.stack([self.vectors[t] for t in texts])

    def abs_cos(self, a: str, b: str) -> float:
        """|cos| of two texts already added; an empty text (e.g. an empty generated summary) has cosine 0."""
        if not a or not b:
            return 0.0
        return abs(float(self.vectors[a].astype(np.float64) @ self.vectors[b].astype(np.float64)))


def same_words(a: str, b: str) -> bool:
    """Whether two texts are the same words, ignoring case and spacing. Synthetic answers are templates, so a right
    memory answer ("You have finished: X and Y.") is the reference word for word, and a near miss (one step wrong)
    is not, although its embedding is close: what the content of a memory turn needs and |cos| cannot tell."""
    return a.casefold().split() == b.casefold().split()


@dataclass
class SplitCounts:
    """The outcome for the reference turns of one memory tag: what reached them. A redundant prediction (matched to
    a silent frame) belongs to no reference turn, so it counts in the all-turn precision only."""

    num_ref: int = 0
    num_matched: int = 0
    num_mismatched: int = 0
    num_exact: int = 0  # TPs whose generated text is the reference's, word for word (`same_words`)
    matched_scores: list[float] = field(default_factory=list)
    tp_pairs: list[tuple[str, str, float]] = field(default_factory=list)

    def exact_rate(self) -> float | None:
        """The share of these reference turns answered word for word; None without reference turns."""
        return self.num_exact / self.num_ref if self.num_ref else None

    def metrics(self) -> dict:
        p, r, f1 = prf(self.num_matched, self.num_matched + self.num_mismatched, self.num_ref)
        return {
            "precision": p,
            "recall": r,
            "f1": f1,
            "num_ref": self.num_ref,
            "num_matched": self.num_matched,
            "num_mismatched": self.num_mismatched,
        }


@dataclass
class SpeakCounts:
    num_pred: int = 0
    num_ref: int = 0
    num_matched: int = 0  # TP
    num_mismatched: int = 0
    num_missed: int = 0
    num_redundant: int = 0
    time_diffs_s: list[float] = field(default_factory=list)  # |j - i| / fps of TP pairs
    matched_scores: list[float] = field(default_factory=list)  # |cos| of every prediction matched to a reference
    tp_pairs: list[tuple[str, str, float]] = field(default_factory=list)  # (generated, reference, |cos|)
    intent_refs: Counter = field(default_factory=Counter)  # references per intent (eval/intents.py)
    intent_tp: Counter = field(default_factory=Counter)  # of those, reached by a TP
    splits: dict[str, SplitCounts] = field(default_factory=dict)  # per memory tag, for tagged references only

    def add_reference(self, labels: str | None, tp: bool) -> None:
        for intent in intents_of(labels):
            self.intent_refs[intent] += 1
            self.intent_tp[intent] += tp
        if (split := self._split(labels)) is not None:
            split.num_ref += 1

    def add_pair(self, gen: str, ref: str, score: float, labels: str | None, time_diff_s: float) -> bool:
        """A prediction matched to a reference turn (with its labels); returns whether it is a TP."""
        split = self._split(labels)
        tp = score > MATCH_THRESHOLD
        for c in (self, split) if split is not None else (self,):
            c.matched_scores.append(score)
            if tp:
                c.num_matched += 1
                c.tp_pairs.append((gen, ref, score))
            else:
                c.num_mismatched += 1
        if tp and split is not None and same_words(gen, ref):
            split.num_exact += 1
        if tp:
            self.time_diffs_s.append(time_diff_s)
        return tp

    def merge(self, other: SpeakCounts) -> None:
        """Add `other`'s counts (another dialogue's) to these, field by field."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name == "splits":
                for tag, split in theirs.items():
                    target = mine.setdefault(tag, SplitCounts())
                    for g in fields(split):
                        setattr(target, g.name, getattr(target, g.name) + getattr(split, g.name))
            else:
                setattr(self, f.name, mine + theirs)  # ints, lists and Counters all add

    def _split(self, labels: str | None) -> SplitCounts | None:
        tag = memory_of(labels)
        return None if tag is None else self.splits.setdefault(tag, SplitCounts())


def speak_dialogue(frames: list[dict], l: int, r: int, fps: float, cache: EmbeddingCache, counts: SpeakCounts) -> None:
    """Match one dialogue and add its outcome to `counts` (the texts must already be in `cache`)."""
    frame_ids = [f["frame"] for f in frames]
    preds = [k for k, f in enumerate(frames) if f["pred_text"]]

    def content(p: int, t: int) -> float:
        ref = frames[t]["ref_text"]
        return 1.0 - cache.abs_cos(frames[preds[p]]["pred_text"], ref) if ref else 1.0

    pairs = match([frame_ids[k] for k in preds], frame_ids, l, r, content)
    reached = {t for _, t in pairs}
    tp_refs = set()
    refs = [k for k, f in enumerate(frames) if f["ref_text"]]
    counts.num_pred += len(preds)
    counts.num_ref += len(refs)
    counts.num_missed += sum(1 for k in refs if k not in reached)
    # A prediction without any feasible frame (only possible with a window excluding 0) counts as redundant.
    counts.num_redundant += len(preds) - len(pairs)
    for p, t in pairs:
        gen, ref = frames[preds[p]]["pred_text"], frames[t]["ref_text"]
        if not ref:
            counts.num_redundant += 1
            continue
        if counts.add_pair(
            gen,
            ref,
            cache.abs_cos(gen, ref),
            frames[t].get("ref_labels"),
            abs(frame_ids[t] - frame_ids[preds[p]]) / fps,
        ):
            tp_refs.add(t)
    for k in refs:
        counts.add_reference(frames[k].get("ref_labels"), k in tp_refs)


def dialogue_texts(dialogues: list[dict]):
    """Every generated and reference text of the dialogues (what the matcher embeds)."""
    return (t for d in dialogues for f in d["frames"] for t in (f["pred_text"], f["ref_text"]))


def speak_counts(dialogues: list[dict], embed: Embed | EmbeddingCache) -> SpeakCounts:
    """Pooled speaking counts of the dialogues of one dataset (each uses its own dataset window and fps). Pass an
    `EmbeddingCache` to reuse embeddings across calls (e.g. while sweeping a threshold)."""
    cache = embed if isinstance(embed, EmbeddingCache) else EmbeddingCache(embed)
    cache.add(dialogue_texts(dialogues))
    counts = SpeakCounts()
    for d in dialogues:
        l, r = window_frames(d["dataset"], d["fps"])
        speak_dialogue(d["frames"], l, r, d["fps"], cache, counts)
    return counts


def speak_metrics(c: SpeakCounts) -> dict:
    p, r, f1 = prf(c.num_matched, c.num_pred, c.num_ref)
    # ProAssist's Jaccard: TP over the union of outcomes, a mismatched pair counted once
    # (= TP / (num_pred + num_ref - TP - num_mismatched)).
    union = c.num_matched + c.num_mismatched + c.num_missed + c.num_redundant
    jaccard = 1.0 if union == 0 else c.num_matched / union
    return {
        "precision": p,
        "recall": r,
        "f1": f1,
        "num_pred": c.num_pred,
        "num_ref": c.num_ref,
        "num_matched": c.num_matched,
        "num_mismatched": c.num_mismatched,
        "num_missed": c.num_missed,
        "num_redundant": c.num_redundant,
        "jaccard": jaccard,
        "time_diff_s": float(np.mean(c.time_diffs_s)) if c.time_diffs_s else 0.0,
        "intent_recall": intent_recall(c.intent_refs, c.intent_tp),
    }
