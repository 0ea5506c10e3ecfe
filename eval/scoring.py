"""`dst score`: every metric of DESIGN section 6 for a list of dialogues, per dataset and as the unweighted mean
over datasets.

Composable for threshold sweeps: `sweep_counts`, or `speak_counts(dialogues_of_one_dataset, embed)` and
`update_counts(...)`, which return pooled counts (`speak_metrics` / `.prf()`) for dialogues whose texts/deltas the
caller re-thresholded. `load_embedder` returns an `EmbeddingCache`, so each distinct text is embedded once across
all calls.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from eval.metrics_dst import dst_metrics, update_counts
from eval.metrics_speak import EmbeddingCache, Embed, speak_counts, speak_metrics
from eval.metrics_text import MeteorScorer, text_metrics

__all__ = ["DEFAULT_STS_MODEL", "score", "sweep_counts", "mean_over_datasets", "by_dataset", "load_embedder",
           "read_predictions", "write_metrics", "speak_counts", "update_counts", "speak_metrics", "EmbeddingCache"]

DEFAULT_STS_MODEL = "sentence-transformers/all-mpnet-base-v2"  # ProAssist's


def by_dataset(dialogues: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for d in dialogues:
        groups[d["dataset"]].append(d)
    return dict(sorted(groups.items()))


def _mean(values: list):
    if isinstance(values[0], dict):
        return {k: _mean([v[k] for v in values]) for k in values[0]}
    if any(v is None for v in values):  # e.g. METEOR unavailable: no mean rather than a mean of fewer datasets
        return None
    return sum(values) / len(values)


def mean_over_datasets(datasets: dict[str, dict]) -> dict:
    """The unweighted mean over datasets of every number (counts too), with the same nested keys."""
    return _mean(list(datasets.values())) if datasets else {}


def score(dialogues: list[dict], embed: Embed | EmbeddingCache, sts_model_name: str, *,
          meteor: MeteorScorer | None = None) -> dict:
    """All metrics. `embed(list[str]) -> [n, d]` is the sentence embedder named `sts_model_name`. `meteor`: an open
    scorer to reuse; by default one METEOR process serves every dataset of this call and is closed at the end."""
    if meteor is None:
        with MeteorScorer() as own:
            return score(dialogues, embed, sts_model_name, meteor=own)
    cache = embed if isinstance(embed, EmbeddingCache) else EmbeddingCache(embed)
    datasets, tokenizers = {}, []
    for name, group in by_dataset(dialogues).items():
        counts = speak_counts(group, cache)
        text, tokenizer = text_metrics(counts.tp_pairs, counts.matched_scores, meteor)
        tokenizers.append(tokenizer)
        datasets[name] = {"speak": speak_metrics(counts), "text": text, "dst": dst_metrics(group)}
    return {"sts_model": sts_model_name, "meteor": meteor.label,
            "tokenizer": "; ".join(dict.fromkeys(tokenizers)),
            "datasets": datasets, "mean": mean_over_datasets(datasets)}


def sweep_counts(dialogues: list[dict], embed: Embed | EmbeddingCache) -> dict:
    """Speaking and update-decision P/R/F1 of one dataset's dialogues, re-thresholded by the caller."""
    speak = speak_metrics(speak_counts(dialogues, embed))
    up, ur, uf = update_counts(dialogues).prf()
    return {"speak_precision": speak["precision"], "speak_recall": speak["recall"], "speak_f1": speak["f1"],
            "update_precision": up, "update_recall": ur, "update_f1": uf}


def load_embedder(name_or_path: str | Path, batch_size: int = 128, device: str | None = None) -> EmbeddingCache:
    """A SentenceTransformer (hub name or local folder) as a caching `embed(list[str]) -> [n, d]`, unit-normalised
    (ProAssist uses batch size 128)."""
    from sentence_transformers import SentenceTransformer  # heavy: only when an embedder is needed

    model = SentenceTransformer(str(name_or_path), device=device)

    def embed(texts: list[str]):
        return model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                            convert_to_numpy=True, show_progress_bar=False)

    return EmbeddingCache(embed)


def read_predictions(path: str | Path) -> list[dict]:
    """predictions.jsonl: one dialogue per non-empty line."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_metrics(path: str | Path, metrics: dict) -> None:
    """metrics.json, written atomically (a partial file never replaces a good one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
