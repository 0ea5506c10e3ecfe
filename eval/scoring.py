"""`dst score`: every metric of docs/design.md §8 for a list of dialogues, per dataset and as the
unweighted mean over datasets.

metrics.json (what `score` returns):

- `protocol` (which frames were scored, eval/protocol.py), `variant`, `dst_window_s`, `num_dialogues`,
  `dialogues_without_reference` (under `proassist` these are scored over zero frames), `reseeds`
  (`total` and per dataset, counted over the scored frames), `sts_model`, `meteor` (which METEOR, or why none),
  `meteor_failures`, `tokenizer`, `non_finite_values` (non-finite numbers written as null; 0 normally);
- per dataset and `mean`: `speak` (the exact min-cost matching, eval/metrics_speak.py), `speak_proassist`
  (ProAssist's find_match reproduced, eval/metrics_proassist.py), each with `intent_recall`; `text` (on the TP
  pairs of `speak`); `dst` and `dst_never` (the never-update predictor on the same references; null when the
  records lack `initial_state`; every DST number null for the variants without a DST); `summary_similarity`
  (summary variant: mean |cos| of generated summaries to the reference progress at the same re-seed; null
  otherwise or when there is none); `memory_split` (memory and local turns apart; null without memory tags);
  `reseeds`.

The mean is over datasets, unweighted, of every number (counts too); null when any dataset's value is null (e.g.
METEOR unavailable), except intent recall and summary similarity, which average the datasets that have a value
(a dataset without references of an intent has no recall for it, which says nothing against the model).

Composable for threshold sweeps: `sweep_counts`, or `speak_counts(dialogues_of_one_dataset, embed)` and
`update_counts(...)`. `load_embedder` returns an `EmbeddingCache`, so each distinct text is embedded once across
all calls of the exact matcher.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from eval.config import DEFAULT_STS_MODEL, DST_WINDOW_S
from eval.intents import MEMORY_TAGS
from eval.jsonio import (
    PredictionsError,
    check_dialogue,
    read_predictions,
    sanitize,
    write_json,
)
from eval.metrics_dst import (
    DST_KEYS,
    dst_metrics,
    never_update_metrics,
    update_counts,
)
from eval.metrics_proassist import ProAssistCounts, proassist_counts, proassist_metrics
from eval.metrics_speak import (
    Embed,
    EmbeddingCache,
    SpeakCounts,
    SplitCounts,
    dialogue_texts,
    speak_counts,
    speak_metrics,
)
from eval.metrics_text import MeteorScorer, text_metrics
from eval.protocol import (
    cut_to_protocol,
    dialogue_name,
    last_reference_row,
    run_variant,
)
from train.variants import get_variant

__all__ = [
    "DEFAULT_STS_MODEL",
    "score",
    "sweep_counts",
    "mean_over_datasets",
    "by_dataset",
    "load_embedder",
    "read_predictions",
    "write_metrics",
    "speak_counts",
    "update_counts",
    "speak_metrics",
    "EmbeddingCache",
    "PredictionsError",
]

PROASSIST_BATCH_SIZE = 128  # ProAssist's sts_eval_batch_size: part of what its embeddings are
MEAN_OVER_AVAILABLE = ("intent_recall", "summary_similarity", "memory_split")


def by_dataset(dialogues: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for d in dialogues:
        groups[d["dataset"]].append(d)
    return dict(sorted(groups.items()))


def _mean(values: list, over_available: bool = False):
    if over_available:
        values = [v for v in values if v is not None]
        if not values:
            return None
    elif any(v is None for v in values):  # e.g. METEOR unavailable: no mean rather than a mean of fewer datasets
        return None
    if isinstance(values[0], dict):
        return {k: _mean([v[k] for v in values], over_available or k in MEAN_OVER_AVAILABLE) for k in values[0]}
    return sum(values) / len(values)


def mean_over_datasets(datasets: dict[str, dict]) -> dict:
    """The unweighted mean over datasets of every number (counts too), with the same nested keys."""
    return _mean(list(datasets.values())) if datasets else {}


def summary_similarity(dialogues: list[dict], cache: EmbeddingCache) -> float | None:
    """Mean |cos| of each generated summary to the reference progress at its re-seed, over the re-seeds that have
    a reference progress (an empty generated summary scores 0); None when there is none."""
    pairs = [
        (r.get("summary") or "", r["ref_progress"])
        for d in dialogues
        for r in d.get("reseeds") or []
        if r.get("ref_progress")
    ]
    if not pairs:
        return None
    cache.add(t for pair in pairs for t in pair)
    return sum(cache.abs_cos(a, b) for a, b in pairs) / len(pairs)


def dst_blocks(group: list[dict], variant: str, dst_window_s: float) -> dict:
    """`dst` and `dst_never`; a variant without a DST (summary, none) has every DST number null (same keys)."""
    if not get_variant(variant).tracks_state:
        empty = dict.fromkeys(DST_KEYS)
        return {"dst": empty, "dst_never": dict(empty)}
    return {"dst": dst_metrics(group, dst_window_s), "dst_never": never_update_metrics(group, dst_window_s)}


def memory_split(counts: SpeakCounts, pro: SpeakCounts, meteor: MeteorScorer, name: str) -> dict | None:
    """Speaking P/R/F1 (both matchers), semantic score and METEOR for the `memory` and the `local` reference turns
    (eval/intents.py); None for data whose turns carry no memory tag (real ProAssist data)."""
    if not counts.splits:
        return None
    out = {}
    for tag in MEMORY_TAGS:
        split, pro_split = counts.splits.get(tag, SplitCounts()), pro.splits.get(tag, SplitCounts())
        text, _ = text_metrics(split.tp_pairs, split.matched_scores, meteor, f"{name} ({tag} turns)")
        out[tag] = {
            "speak": split.metrics(),
            "speak_proassist": pro_split.metrics(),
            "text": {
                "semantic_score": text["semantic_score"],
                "METEOR": text["METEOR"],
                "exact_answers": split.exact_rate(),
            },
        }
    return out


def dialogue_scores(d: dict, pro: SpeakCounts, counts: SpeakCounts) -> dict:
    """One dialogue's ProAssist-matched speaking F1, on all its turns and on its memory turns, and the share of its
    memory turns answered word for word (`counts`: its own matching; None when it has no memory turn): the numbers
    experiments pair across cells (experiments/compare.py)."""
    memory, own = pro.splits.get("memory"), counts.splits.get("memory")
    return {
        "dataset": d["dataset"],
        "video_uid": d.get("video_uid"),
        "conversation": d.get("conversation"),
        "speak_proassist_f1": proassist_metrics(pro)["f1"],
        "memory_speak_proassist_f1": memory.metrics()["f1"] if memory and memory.num_ref else None,
        "memory_exact": own.exact_rate() if own else None,
    }


def check_scorable(dialogues: list[dict], protocol: str) -> tuple[str, list[dict]]:
    """(variant, the dialogues cut to `protocol`); PredictionsError/ScoringError when they cannot be scored. Cheap:
    `dst score` calls it before loading any model."""
    for n, d in enumerate(dialogues):
        check_dialogue(d, f"dialogue {n} ({dialogue_name(d) if isinstance(d, dict) else '?'})")
    return run_variant(dialogues), cut_to_protocol(dialogues, protocol)


def score(
    dialogues: list[dict],
    embed: Embed | EmbeddingCache,
    sts_model_name: str,
    *,
    meteor: MeteorScorer | None = None,
    protocol: str = "proassist",
    dst_window_s: float = DST_WINDOW_S,
) -> dict:
    """All metrics (see the module docstring). `embed(list[str]) -> [n, d]` is the sentence embedder named
    `sts_model_name` (its raw output: `speak_proassist` needs the unnormalised float32 vectors). `meteor`: an open
    scorer to reuse; by default one METEOR process serves every dataset of this call and is closed at the end.
    Raises PredictionsError or ScoringError (one line) for dialogues it cannot score."""
    if meteor is None:
        with MeteorScorer() as own:
            return score(dialogues, embed, sts_model_name, meteor=own, protocol=protocol, dst_window_s=dst_window_s)
    variant, scored = check_scorable(dialogues, protocol)
    cache = embed if isinstance(embed, EmbeddingCache) else EmbeddingCache(embed)
    datasets, tokenizers, per_dialogue = {}, [], []
    for name, group in by_dataset(scored).items():
        counts, pro = SpeakCounts(), ProAssistCounts()
        cache.add(dialogue_texts(group))  # one embedding batch per dataset, not one per dialogue
        for d in group:  # one dialogue at a time (as both matchers work anyway), kept for paired tests
            one, own = proassist_counts([d], cache.raw), speak_counts([d], cache)
            pro.merge(one)
            counts.merge(own)
            per_dialogue.append(dialogue_scores(d, one, own))
        text, tokenizer = text_metrics(counts.tp_pairs, counts.matched_scores, meteor, name)
        tokenizers.append(tokenizer)
        datasets[name] = {
            "speak": speak_metrics(counts),
            "speak_proassist": proassist_metrics(pro),
            "text": text,
            "memory_split": memory_split(counts, pro, meteor, name),
            **dst_blocks(group, variant, dst_window_s),
            "summary_similarity": summary_similarity(group, cache) if get_variant(variant).writes_summary else None,
            "reseeds": sum(len(d.get("reseeds") or []) for d in group),
        }
    metrics = {
        "protocol": protocol,
        "variant": variant,
        "dst_window_s": dst_window_s,
        "num_dialogues": len(dialogues),
        "dialogues_without_reference": sum(1 for d in dialogues if last_reference_row(d["frames"]) < 0),
        "reseeds": {
            "total": sum(m["reseeds"] for m in datasets.values()),
            "datasets": {name: m["reseeds"] for name, m in datasets.items()},
        },
        "sts_model": sts_model_name,
        "meteor": meteor.label,
        "meteor_failures": list(meteor.failures),
        "tokenizer": "; ".join(dict.fromkeys(tokenizers)),
        "datasets": datasets,
        "mean": mean_over_datasets(datasets),
        "per_dialogue": per_dialogue,
    }
    metrics, replaced = sanitize(metrics)
    metrics["non_finite_values"] = replaced
    return metrics


def sweep_counts(dialogues: list[dict], embed: Embed | EmbeddingCache, dst_window_s: float = DST_WINDOW_S) -> dict:
    """Speaking (exact `speak`) and update-decision P/R/F1 of one dataset's dialogues, re-thresholded by the
    caller."""
    speak = speak_metrics(speak_counts(dialogues, embed))
    up, ur, uf = update_counts(dialogues, dst_window_s).prf()
    return {
        "speak_precision": speak["precision"],
        "speak_recall": speak["recall"],
        "speak_f1": speak["f1"],
        "update_precision": up,
        "update_recall": ur,
        "update_f1": uf,
    }


def load_embedder(
    name_or_path: str | Path, batch_size: int = PROASSIST_BATCH_SIZE, device: str | None = None
) -> EmbeddingCache:
    """A SentenceTransformer (hub name or local folder) as a caching `embed(list[str]) -> [n, d]`. The embedder
    returns the model's raw float32 output as ProAssist requests it (`encode(..., convert_to_tensor=True,
    batch_size=128)`, no extra normalisation); the exact matcher normalises in float64 itself."""
    from sentence_transformers import (
        SentenceTransformer,  # heavy: only when an embedder is needed
    )

    model = SentenceTransformer(str(name_or_path), device=device)

    def embed(texts: list[str]):
        return model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)

    return EmbeddingCache(embed)


def write_metrics(path: str | Path, metrics: dict) -> int:
    """metrics.json, strict JSON (non-finite numbers as null), written atomically; returns how many were null'ed."""
    return write_json(path, metrics)
