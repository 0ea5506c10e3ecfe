"""Which DST transitions a `dst` model misses: recall of the reference transitions, split by whether the step
changes alone at its decision point or at a hand-over (one step completes and another starts at the same point).

    python benchmarks/transition_recall.py RUN/cells/variant-dst/seed-*/test/predictions.jsonl

A reference transition (step, new state) counts as found when a predicted update sets the same step to the same
state within two seconds (4 frames at 2 fps) either side, the DST metrics' default window (docs/design.md §8).
"""

from __future__ import annotations

import json
import sys
from collections import Counter

WINDOW = 4  # frames each side: --dst-window 2.0 s at 2 fps


def transition_recall(paths: list[str]) -> dict[tuple[str, str], tuple[int, float]]:
    total, found = Counter(), Counter()
    for path in paths:
        with open(path) as f:
            for line in f:
                frames = json.loads(line)["frames"]
                for j, frame in enumerate(frames):
                    delta = frame["ref_dst_delta"] or {}
                    for node, state in delta.items():
                        kind = (state, "hand-over" if len(delta) > 1 else "alone")
                        total[kind] += 1
                        near = frames[max(0, j - WINDOW) : j + WINDOW + 1]
                        found[kind] += any((f["pred_dst_delta"] or {}).get(node) == state for f in near)
    return {kind: (total[kind], found[kind] / total[kind]) for kind in sorted(total)}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for (state, kind), (n, recall) in transition_recall(sys.argv[1:]).items():
        print(f"-> {state:<11} {kind:<9} {n:5d} transitions, recall {recall:.2f}")
