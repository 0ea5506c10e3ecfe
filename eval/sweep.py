"""Decision thresholds: the sweep on teacher-forced records (`dst eval --sweep`) and thresholds.json.

With the ground truth in the context a decision's probability does not depend on the threshold, so one
teacher-forced pass gives F1 at every threshold. The grid (THRESHOLDS) reaches low probabilities, where a model
trained on rare positives (1-5% of the frames) often puts its best threshold: 0.001 .. 0.04 on a rough log scale,
0.05 .. 0.95 in steps of 0.05, then 0.97 and 0.99.

The speaking curve is the exact `speak` F1, not `speak_proassist`: the sweep scores every threshold, the exact
matcher reuses one embedding per distinct text (the ProAssist reproduction re-embeds every pair of every dialogue),
and it has no zero-cost quirk that could favour a threshold for the wrong reason. The update curve is the
update-decision F1 in the symmetric DST window.

The best threshold is the middle one of those reaching the maximum F1 (a plateau's centre is the least fragile
choice). A warning (console and `warnings` in thresholds.json) says when the maximum is reached at an end of the
grid (the best threshold may lie beyond it) or F1 is zero at every threshold (nothing to choose from).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

from rich.console import Console

from core.errors import InputError
from eval.jsonio import write_json
from eval.metrics_dst import DST_WINDOW_S
from eval.protocol import cut_to_protocol
from eval.scoring import by_dataset, sweep_counts
from eval.stream import apply_thresholds

log = logging.getLogger(__name__)

THRESHOLDS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.04] + [round(0.05 * i, 2) for i in range(1, 20)] + [0.97, 0.99]
DECISIONS = ("speak", "update")


class ThresholdsError(InputError):
    """A thresholds.json that cannot be used: the one-line message names the file and the reason."""


def best_threshold(thresholds: list[float], f1: list[float]) -> float:
    """The middle of the thresholds reaching the maximum F1."""
    top = max(f1)
    at_top = [t for t, v in zip(thresholds, f1) if v == top]
    return at_top[(len(at_top) - 1) // 2]


def curve_warnings(dataset: str, decision: str, thresholds: list[float], f1: list[float]) -> list[str]:
    top = max(f1)
    if top == 0:
        return [
            f"{dataset} {decision}: F1 is 0 at every threshold ({thresholds[0]} .. {thresholds[-1]}); "
            f"the chosen threshold means nothing"
        ]
    out = []
    for end, name in ((0, "lowest"), (-1, "highest")):
        if f1[end] == top:
            out.append(
                f"{dataset} {decision}: the best F1 ({top:.3f}) is reached at the {name} threshold of the "
                f"grid ({thresholds[end]}); the best threshold may lie beyond it"
            )
    return out


def sweep_thresholds(
    dialogues: list[dict],
    embed,
    thresholds: list[float] = THRESHOLDS,
    *,
    protocol: str = "proassist",
    dst_window_s: float = DST_WINDOW_S,
    console: Console | None = None,
) -> dict:
    """F1 against each threshold, per dataset and decision, from teacher-forced records (which hold what the
    model generated wherever a probability exceeded the streamer's `generate_above`), and the best threshold."""
    result = {"protocol": protocol, "dst_window_s": dst_window_s, "datasets": {}, "warnings": []}
    for dataset, group in by_dataset(cut_to_protocol(dialogues, protocol)).items():
        swept = copy.deepcopy(group)  # apply_thresholds rewrites the predictions in place
        curves = {name: [] for name in DECISIONS}
        for theta in thresholds:
            for d in swept:
                apply_thresholds(d["frames"], theta, theta)
            f1 = sweep_counts(swept, embed, dst_window_s=dst_window_s)
            curves["speak"].append(f1["speak_f1"])
            curves["update"].append(f1["update_f1"])
        result["datasets"][dataset] = {
            name: {"thresholds": list(thresholds), "f1": values, "best": best_threshold(thresholds, values)}
            for name, values in curves.items()
        }
        for name, values in curves.items():
            result["warnings"] += curve_warnings(dataset, name, thresholds, values)
    for warning in result["warnings"]:
        log.warning("threshold sweep: %s", warning)
        if console is not None:
            console.print(f"[yellow]warning:[/] threshold sweep: {warning}", highlight=False)
    return result


def write_thresholds(path: str | Path, sweep: dict) -> None:
    write_json(path, sweep, indent=1)


def best_from_sweep(sweep: dict) -> dict[str, tuple[float, float]]:
    """{dataset: (theta_update, theta_speak)} of a sweep result."""
    return {ds: (v["update"]["best"], v["speak"]["best"]) for ds, v in sweep["datasets"].items()}


def load_thresholds(path: str | Path, datasets=None) -> dict[str, tuple[float, float]]:
    """{dataset: (theta_update, theta_speak)} from a thresholds.json written by `--sweep`, validated. Every dataset
    in `datasets` (the ones about to be evaluated; None = no check) must be in it: a missing one is refused, never
    silently given 0.5."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ThresholdsError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ThresholdsError(f"{path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise ThresholdsError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise ThresholdsError(f"{path}: malformed JSON (nested too deeply)") from None
    per = data.get("datasets") if isinstance(data, dict) else None
    if not isinstance(per, dict) or not per:
        raise ThresholdsError(f"{path}: not a thresholds file (no 'datasets' object); write one with dst eval --sweep")
    out = {}
    for dataset, curves in per.items():
        pair = []
        for decision in ("update", "speak"):
            best = curves.get(decision, {}).get("best") if isinstance(curves, dict) else None
            if (
                not isinstance(best, (int, float))
                or isinstance(best, bool)
                or not math.isfinite(best)
                or not 0 <= best <= 1
            ):
                raise ThresholdsError(
                    f"{path}: dataset '{dataset}' has no valid '{decision}' threshold "
                    f"(a number in [0, 1]), got {best!r}"
                )
            pair.append(float(best))
        out[dataset] = (pair[0], pair[1])
    missing = sorted(set(datasets or ()) - set(out))
    if missing:
        raise ThresholdsError(
            f"{path} has no thresholds for dataset(s) {', '.join(missing)} (it has "
            f"{', '.join(sorted(out))}); sweep on a split that contains them"
        )
    return out
