"""`speak_proassist`: ProAssist's own speaking score, reproduced to the float (docs/design.md §8), beside the
exact `speak`.

ProAssist (`mmassist/eval/evaluators/pred_match.py: find_match`, pooled by `stream_evaluator.compute_metrics`)
matches each dialogue on a float32 cost matrix over the list positions of its frames, rows = frames with generated
text, columns = all frames:

- base cost 0 when both sides talk, 1 when only the prediction does;
- inside the window (`l <= j - i <= r`), a pair where both talk costs `1 - |cos|` instead, the cosine of the raw
  float32 sentence embeddings of the pair, encoded per dialogue as one list `[g, r, g, r, ...]` (batch size 128)
  and compared like `sentence_transformers.util.pairwise_cos_sim` (L2-normalise each, multiply, sum; in torch);
- plus `|i - j| ** 1.5 * (0.3 / rg ** 1.5)` in float32 torch arithmetic, infinite outside the window.

The dense matrix goes through `scipy.sparse.csr_matrix`, which drops entries that are exactly 0, and
`min_weight_full_bipartite_matching`, which also removes infinite entries (scipy >= 1.6), so the edges are the
finite, non-zero costs inside the window. The consequence is the quirk this score exists to reproduce: a prediction
whose cost on its own frame is exactly 0 (a verbatim copy of the reference there, when the float32 cosine of the
two identical embeddings rounds to exactly 1; it may also round to 1 +- 1 ulp, and then the edge stays) cannot take
that frame: it lands on a neighbour, typically as one redundant plus one missed. Counted as `zero_cost_dropped`,
next to `exact_copies` (predictions equal to the reference on the reference's own frame).

We build the same edges directly in CSR order (row-major, ascending columns), which is exactly what scipy keeps of
their dense matrix, so the matcher sees identical input. Outcomes and pooling are theirs: a prediction matched to a
talking frame is matched (semantic score `1 - cost without distance`, float32 -> float; TP when > 0.5), to a silent
frame redundant; a reference frame no prediction took is missed; P = TP / (matched + redundant), R = TP / (matched
+ missed), pooled over a dataset's dialogues.

Where theirs crashes we go on and count it: no full matching (a Hall violation after dropped edges; scipy raises)
-> the most predictions matched at least cost, the others redundant (`no_full_matching` dialogues); a dialogue of
zero frames (their `torch.range(1, 0)` raises) -> nothing to match; a window with `rg = 0` (their division by zero)
-> no distance cost; P/R/F1 on zero counts -> `prf`'s convention (0, or 1.0 when nothing was predicted or expected).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from eval.metrics_speak import (
    DIST_FACTOR,
    DIST_POWER,
    SpeakCounts,
    speak_metrics,
    window_frames,
)

# Raw embedder: list of texts -> [n, d] (numpy or a torch tensor), the model's output before any normalisation.
RawEmbed = Callable[[list[str]], object]


def distance_table(rg: int, size: int) -> np.ndarray:
    """float32 `d ** 1.5 * (0.3 / rg ** 1.5)` for d = 0 .. size - 1, in torch's arithmetic as theirs.
    torch's scalar and vectorised float32 pow disagree in the last bit for some d >= 70, and theirs takes the
    vectorised path for almost every entry: compute on a buffer long enough to be vectorised."""
    multiplier = DIST_FACTOR / rg**DIST_POWER if rg else 0.0
    d = torch.arange(max(size, 256), dtype=torch.float32)
    return ((d.abs() ** DIST_POWER) * multiplier)[:size].numpy()


def semantic_costs(raw_embed: RawEmbed, pairs: list[tuple[str, str]]) -> np.ndarray:
    """float32 `1 - |cos|` per (generated, reference) pair, from one embedding call over the interleaved list."""
    if not pairs:
        return np.zeros(0, dtype=np.float32)
    emb = raw_embed([s for pair in pairs for s in pair])
    emb = emb if isinstance(emb, torch.Tensor) else torch.from_numpy(np.asarray(emb))
    if emb.dtype != torch.float32:  # sentence-transformers' embeddings are float32 (it upcasts fp16 ones too)
        emb = emb.float()
    emb = emb.view(len(pairs), 2, -1)
    cos = (F.normalize(emb[:, 0], p=2, dim=-1) * F.normalize(emb[:, 1], p=2, dim=-1)).sum(dim=-1)
    return (1 - cos.abs()).cpu().numpy().astype(np.float32)


@dataclass
class ProAssistCounts(SpeakCounts):
    """SpeakCounts plus the three things only this matcher has."""

    exact_copies: int = 0
    zero_cost_dropped: int = 0
    no_full_matching: int = 0  # dialogues


def _full_matching(graph: csr_matrix) -> tuple[np.ndarray, np.ndarray, bool]:
    """(rows, cols, full): scipy's matching, or where none is full, the most rows at least cost (each row gets a
    private dummy column dearer than any set of real edges, so fewer dummies always win)."""
    try:
        rows, cols = min_weight_full_bipartite_matching(graph)
        return np.asarray(rows), np.asarray(cols), True
    except ValueError:
        n, m = graph.shape
        coo = graph.tocoo()
        big = n * (float(np.abs(coo.data).max(initial=0.0)) + 1.0) + 1.0
        padded = csr_matrix(
            (
                np.concatenate([coo.data.astype(np.float64), np.full(n, big)]),
                (np.concatenate([coo.row, np.arange(n)]), np.concatenate([coo.col, m + np.arange(n)])),
            ),
            shape=(n, m + n),
        )
        rows, cols = min_weight_full_bipartite_matching(padded)
        real = np.asarray(cols) < m
        return np.asarray(rows)[real], np.asarray(cols)[real], False


def proassist_dialogue(
    frames: list[dict], l: int, r: int, fps: float, raw_embed: RawEmbed, counts: ProAssistCounts
) -> None:
    """Match one dialogue as ProAssist's find_match does and add its outcome to `counts`."""
    n = len(frames)
    gens = [i for i, f in enumerate(frames) if f["pred_text"] != ""]
    refs = [j for j, f in enumerate(frames) if f["ref_text"] != ""]
    counts.num_pred += len(gens)
    counts.num_ref += len(refs)
    counts.exact_copies += sum(1 for f in frames if f["ref_text"] != "" and f["pred_text"] == f["ref_text"])
    if n == 0:
        return
    spans = [range(max(i + l, 0), min(i + r + 1, n)) for i in gens]
    pairs = [(i, j) for i, span in zip(gens, spans) for j in span if frames[j]["ref_text"] != ""]
    sem = dict(
        zip(pairs, semantic_costs(raw_embed, [(frames[i]["pred_text"], frames[j]["ref_text"]) for i, j in pairs]))
    )
    dist = distance_table(max(abs(l), r), max(abs(l), r) + 1)
    data, indices, indptr = [], [], [0]
    for i, span in zip(gens, spans):
        for j in span:
            cost = (sem[(i, j)] if (i, j) in sem else np.float32(1.0)) + dist[abs(i - j)]  # float32 sum
            if cost == 0:  # csr_matrix drops an explicit zero: the edge is gone
                counts.zero_cost_dropped += 1
                continue
            data.append(cost)
            indices.append(j)
        indptr.append(len(data))
    rows, cols, full = np.zeros(0, int), np.zeros(0, int), True
    if gens:
        graph = csr_matrix(
            (
                np.asarray(data, dtype=np.float32),
                np.asarray(indices, dtype=np.int32),
                np.asarray(indptr, dtype=np.int32),
            ),
            shape=(len(gens), n),
        )
        rows, cols, full = _full_matching(graph)
    counts.no_full_matching += not full
    counts.num_redundant += len(gens) - len(rows)  # unmatched where no full matching exists
    taken = {int(c) for c in cols}
    tp_refs = set()
    for row, j in zip(rows, cols):
        i, j = gens[int(row)], int(j)
        gen, ref = frames[i]["pred_text"], frames[j]["ref_text"]
        if ref == "":
            counts.num_redundant += 1
            continue
        score = 1.0 - float(sem[(i, j)])  # their `1 - match_cost[i, j].item()`
        if counts.add_pair(
            gen, ref, score, frames[j].get("ref_labels"), abs(frames[j]["frame"] - frames[i]["frame"]) / fps
        ):
            tp_refs.add(j)
    counts.num_missed += sum(1 for j in refs if j not in taken)
    for j in refs:
        counts.add_reference(frames[j].get("ref_labels"), j in tp_refs)


def proassist_counts(dialogues: list[dict], raw_embed: RawEmbed) -> ProAssistCounts:
    """Pooled counts of one dataset's dialogues (each with its own window and fps)."""
    counts = ProAssistCounts()
    for d in dialogues:
        l, r = window_frames(d["dataset"], d["fps"])
        proassist_dialogue(d["frames"], l, r, d["fps"], raw_embed, counts)
    return counts


def proassist_metrics(c: ProAssistCounts) -> dict:
    """`speak`'s keys (ProAssist's pooling gives the same formulas on these counts) plus the quirk's counters."""
    return {
        **speak_metrics(c),
        "exact_copies": c.exact_copies,
        "zero_cost_dropped": c.zero_cost_dropped,
        "no_full_matching": c.no_full_matching,
    }
