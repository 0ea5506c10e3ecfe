"""One optimizer step's arithmetic: loss terms, their normalisation over the global batch, and validation.

Each term is a mean over its own positions across the whole global batch (all micro-batches of an accumulation
window on all ranks), so two processes with DDP compute the same update as one process seeing both halves: a
micro-batch's mean is rescaled by `count_here * world / count_global` (DDP then averages gradients over ranks).
"""

from __future__ import annotations

import torch

from train.batch import Batch
from train.config import TrainConfig
from train.losses import TERMS, LossWeights, combine, decision_loss, lm_loss


def loss_terms(out: dict, batch: Batch, cfg: TrainConfig) -> tuple[dict, dict]:
    """(mean per term, positions per term) for one micro-batch."""
    terms = {
        "update": decision_loss(
            cfg.decision_loss,
            out["update"],
            batch.update_labels,
            batch.update_weights,
            alpha=cfg.focal_alpha,
            gamma=cfg.focal_gamma,
        ),
        "speak": decision_loss(
            cfg.decision_loss,
            out["speak"],
            batch.speak_labels,
            batch.speak_weights,
            alpha=cfg.focal_alpha,
            gamma=cfg.focal_gamma,
        ),
        "dst_text": lm_loss(out["dst_text"], out["dst_text_targets"]),
        "response": lm_loss(out["response"], out["response_targets"]),
        "summary": lm_loss(out["summary"], out["summary_targets"]),
    }
    return terms, counts(batch)


def counts(batch: Batch) -> dict[str, float]:
    return {
        "update": float(batch.update_weights.sum()),
        "speak": float(batch.speak_weights.sum()),
        "dst_text": float(batch.dst_index.shape[0]),
        "response": float(batch.response_index.shape[0]),
        "summary": float(batch.summary_index.shape[0]),
    }


def global_counts(batches: list[Batch], device: torch.device, world: int) -> dict[str, float]:
    total = torch.tensor([[counts(b)[t] for t in TERMS] for b in batches], device=device).sum(0)
    if world > 1:
        torch.distributed.all_reduce(total)
    return dict(zip(TERMS, total.tolist()))


def scaled_loss(terms: dict, here: dict, total: dict, cfg: TrainConfig, world: int) -> torch.Tensor:
    """This micro-batch's share of the global-batch loss (see module doc)."""
    scaled = {t: terms[t] * (here[t] * world / total[t] if total[t] > 0 else 0.0) for t in TERMS}
    return combine(scaled, loss_weights(cfg))


def loss_weights(cfg: TrainConfig) -> LossWeights:
    return LossWeights(cfg.w_upd, cfg.w_dst, cfg.w_spk, cfg.w_rsp, cfg.w_sum)


@torch.no_grad()
def validate(model, batches, cfg: TrainConfig, runtime) -> dict[str, float]:
    """Mean losses and decision precision/recall/F1 (threshold 0.5) over validation batches, pooled over ranks."""
    model.eval()
    # per term: loss sum, count; per decision: tp, fp, fn
    sums = torch.zeros(len(TERMS) * 2 + 6, dtype=torch.float64, device=runtime.device)
    for batch in batches:
        batch = batch.to(runtime.device)
        with runtime.autocast():
            out = model(batch)
        terms, here = loss_terms(out, batch, cfg)
        for i, t in enumerate(TERMS):
            sums[2 * i] += float(terms[t]) * here[t]
            sums[2 * i + 1] += here[t]
        for j, name in enumerate(("update", "speak")):
            pred = out[name].float() > 0
            gold = getattr(batch, f"{name}_labels") > 0.5
            base = 2 * len(TERMS) + 3 * j
            sums[base] += float((pred & gold).sum())
            sums[base + 1] += float((pred & ~gold).sum())
            sums[base + 2] += float((~pred & gold).sum())
    if runtime.world > 1:
        torch.distributed.all_reduce(sums)
    model.train()
    s = sums.tolist()
    metrics = {f"val_{t}": s[2 * i] / s[2 * i + 1] if s[2 * i + 1] else 0.0 for i, t in enumerate(TERMS)}
    for j, name in enumerate(("update", "speak")):
        tp, fp, fn = s[2 * len(TERMS) + 3 * j : 2 * len(TERMS) + 3 * j + 3]
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        metrics |= {
            f"val_{name}_precision": p,
            f"val_{name}_recall": r,
            f"val_{name}_f1": 2 * p * r / (p + r) if p + r else 0.0,
        }
    return metrics
