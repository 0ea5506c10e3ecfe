"""Paired comparison of two cells of an experiment: can the difference be called a win?

Both cells streamed the same test dialogues with the same seeds, so the comparison pairs them: for every dialogue
and seed, the difference of the two cells' per-dialogue ProAssist-matched speaking F1 (metrics.json
`per_dialogue`, written by eval/scoring.py), on all turns and on memory turns, and of the share of memory turns
answered word for word (dialogues without memory turns drop out of those two). The estimate is the mean
difference pooled over dialogues and seeds; its 95% interval is a percentile bootstrap that resamples dialogues
(each drawn dialogue brings its differences under every seed, since the seeds of one dialogue are not independent
draws), with a seeded generator, so the interval is reproducible.
An interval that contains 0 is not a win.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0
MEASURES = {
    "all turns": "speak_proassist_f1",
    "memory turns": "memory_speak_proassist_f1",
    "memory turns, exact answers": "memory_exact",  # the content a memory turn needs (eval/metrics_speak.same_words)
}


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n_dialogues: int
    n_pairs: int

    @property
    def win(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_differences(a: list[dict], b: list[dict], key: str) -> dict[tuple, list[float]]:
    """Per dialogue (dataset, video_uid, conversation): the differences a - b of `key`, one per seed both cells
    ran. `a`, `b`: the results lines of the two cells."""
    by_seed = {}
    for lines, side in ((a, 0), (b, 1)):
        for line in lines:
            for d in line["metrics"].get("test.per_dialogue") or []:
                by_seed.setdefault((d["dataset"], d["video_uid"], d["conversation"], line["seed"]), [None, None])[
                    side
                ] = d.get(key)
    diffs: dict[tuple, list[float]] = {}
    for (*dialogue, _seed), (x, y) in sorted(by_seed.items(), key=lambda kv: str(kv[0])):
        if x is not None and y is not None:
            diffs.setdefault(tuple(dialogue), []).append(x - y)
    return diffs


def bootstrap(
    diffs: dict[tuple, list[float]], samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED
) -> Interval | None:
    """The pooled mean difference and its 95% percentile interval, dialogues resampled; None without pairs."""
    groups = [np.asarray(v, dtype=np.float64) for _, v in sorted(diffs.items(), key=lambda kv: str(kv[0]))]
    if not groups:
        return None
    sums, counts = np.array([g.sum() for g in groups]), np.array([len(g) for g in groups])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(groups), size=(samples, len(groups)))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Interval(float(sums.sum() / counts.sum()), float(low), float(high), len(groups), int(counts.sum()))


def compare(lines: list[dict], a: str, b: str) -> dict[str, Interval | None]:
    """Cell `a` minus cell `b` (cell names as in the results lines), per measure."""
    la, lb = [ln for ln in lines if ln["cell"] == a], [ln for ln in lines if ln["cell"] == b]
    return {name: bootstrap(paired_differences(la, lb, key)) for name, key in MEASURES.items()}
