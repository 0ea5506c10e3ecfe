"""Training losses: the two decision heads (focal, class-balanced BCE, plain BCE), the shifted LM loss, negative
subsampling (rho) and the weighted total (docs/design.md §4.4, §6).

Every loss casts its inputs to fp32 first (training may run under fp16/bf16 autocast) and is a mean over its own
positions. Means are weighted, `sum(w * l) / sum(w)`, with weight 0 excluding a position; an empty term is an exact
0 that is still connected to the logits, so `backward()` works on every batch. None of them synchronises with the
GPU (no `.item()`): empty cases fall out of the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from train.config import DECISION_LOSSES

TERMS = ("update", "dst_text", "speak", "response", "summary")
LOSS_WEIGHT_NAMES = ("w_upd", "w_dst", "w_spk", "w_rsp", "w_sum")  # LossWeights field of each term, in TERMS order
# Any finite logit beyond this is saturated in fp32; clamping maps fp16 overflow (+-inf) here so loss and grads stay
# finite, and keeps weight-0 positions finite so that 0 * loss is an exact 0 (0 * inf would be NaN).
LOGIT_LIMIT = 1e6
_TINY = torch.finfo(torch.float32).tiny


def _prepare(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None):
    x = logits.float().clamp(-LOGIT_LIMIT, LOGIT_LIMIT)
    t = targets.to(device=x.device, dtype=torch.float32)
    w = torch.ones_like(x) if weights is None else weights.to(device=x.device, dtype=torch.float32)
    if not x.shape == t.shape == w.shape or x.dim() != 1:
        raise ValueError(f"expected 1-d logits, targets, weights of one shape; got {x.shape}, {t.shape}, {w.shape}")
    return x, t, w


def _weighted_mean(losses: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # With all weights 0 the numerator is exactly 0 (losses are finite), so the clamp yields 0 with a grad_fn.
    return (w * losses).sum() / w.sum().clamp_min(_TINY)


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Binary focal loss (Lin et al. 2017): `-alpha_t * (1 - p_t)^gamma * log(p_t)`, alpha_t = alpha for positives
    and 1 - alpha for negatives. `-log(p_t)` is BCE-with-logits (stable); soft targets interpolate as in torchvision's
    `sigmoid_focal_loss`."""
    x, t, w = _prepare(logits, targets, weights)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p = torch.sigmoid(x)
    one_minus_pt = p + t - 2 * p * t  # = 1 - (p*t + (1-p)*(1-t))
    if gamma == 0:
        modulating = torch.ones_like(x)
    elif gamma < 1:
        # d/dx base^gamma is infinite at base 0 for gamma < 1 (0 * inf = NaN in backward); keep the base positive.
        modulating = one_minus_pt.clamp_min(_TINY) ** gamma
    else:
        modulating = one_minus_pt**gamma
    alpha_t = alpha * t + (1 - alpha) * (1 - t)
    return _weighted_mean(alpha_t * modulating * ce, w)


def balanced_bce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """ProAssist's class-balanced BCE: (mean BCE over positives + mean BCE over negatives) / 2. A class with no
    positions (or only weight-0 ones) contributes nothing: the loss is then just the other class's mean, and 0 when
    both are empty. A position is positive when its target is >= 0.5."""
    x, t, w = _prepare(logits, targets, weights)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    positive = (t >= 0.5).float()
    w_pos, w_neg = w * positive, w * (1 - positive)
    total = _weighted_mean(ce, w_pos) + _weighted_mean(ce, w_neg)  # an empty class adds an exact 0
    present = (w_pos.sum() > 0).float() + (w_neg.sum() > 0).float()
    return total / present.clamp_min(1)


def bce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Plain (weighted) mean BCE-with-logits."""
    x, t, w = _prepare(logits, targets, weights)
    return _weighted_mean(F.binary_cross_entropy_with_logits(x, t, reduction="none"), w)


def decision_loss(
    kind: str,
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Dispatch on `kind` in DECISION_LOSSES; alpha and gamma only apply to focal."""
    if kind == "focal":
        return focal_loss(logits, targets, weights, alpha=alpha, gamma=gamma)
    if kind == "balanced_bce":
        return balanced_bce(logits, targets, weights)
    if kind == "bce":
        return bce(logits, targets, weights)
    raise ValueError(f"unknown decision loss {kind!r}; expected one of {DECISION_LOSSES}")


# ----------------------------------------------------------------------------------------------- LM loss


def shifted_positions(index: torch.Tensor) -> torch.Tensor:
    """(row, pos) target positions `[N, 2]` -> the (row, pos - 1) positions whose logits predict them (the shift).
    A target at position 0 has no predecessor: ValueError (a plain assert would vanish under `python -O`)."""
    if index.dim() != 2 or index.shape[1] != 2:
        raise ValueError(f"expected [N, 2] (row, pos) positions, got {tuple(index.shape)}")
    if index.numel() and bool((index[:, 1] < 1).any()):
        raise ValueError("an LM target at position 0 has no previous position to predict it")
    return index - torch.tensor([0, 1], dtype=index.dtype, device=index.device)


def lm_loss(logits_at_prev: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy, mean over targets, in fp32. `logits_at_prev` `[N, V]` are already gathered at the
    positions from `shifted_positions`; `target_ids` `[N]` are the ids at the target positions."""
    if logits_at_prev.dim() != 2 or target_ids.shape != logits_at_prev.shape[:1]:
        raise ValueError(
            f"expected [N, V] logits and [N] targets, got {tuple(logits_at_prev.shape)}, {tuple(target_ids.shape)}"
        )
    logits = logits_at_prev.float()
    if target_ids.numel() == 0:
        return logits.sum() * 0  # cross_entropy's mean over nothing is NaN
    return F.cross_entropy(logits, target_ids.to(logits.device))


# ----------------------------------------------------------------------------------------------- subsampling


def negative_keep_mask(labels: torch.Tensor, rho: float, generator: torch.Generator) -> torch.Tensor:
    """Float weights for `labels`: 1 for every positive (label >= 0.5), and for each negative 1 with probability rho,
    else 0. One uniform draw per position (positives too) from `generator`, so the caller's per-epoch seed fixes the
    whole mask: re-drawn each epoch, reproducible on resume. Returned on `labels.device`."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    draws = torch.rand(labels.shape, generator=generator, device=generator.device).to(labels.device)
    keep = (labels >= 0.5) | (draws < rho)  # draws lie in [0, 1): rho=1 keeps all, rho=0 drops all negatives
    return keep.float()


# ----------------------------------------------------------------------------------------------- total


@dataclass(frozen=True)
class LossWeights:
    w_upd: float = 1.0
    w_dst: float = 1.0
    w_spk: float = 1.0
    w_rsp: float = 1.0
    w_sum: float = 1.0


def combine(terms: dict[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    """w_upd * update + w_dst * dst_text + w_spk * speak + w_rsp * response + w_sum * summary. Every term is
    required (each is an exact 0 when the batch has none of its positions), so a forgotten term is an error, not a
    silent 0."""
    if set(terms) != set(TERMS):
        raise ValueError(f"expected loss terms {TERMS}, got {tuple(terms)}")
    return (
        weights.w_upd * terms["update"].float()
        + weights.w_dst * terms["dst_text"].float()
        + weights.w_spk * terms["speak"].float()
        + weights.w_rsp * terms["response"].float()
        + weights.w_sum * terms["summary"].float()
    )
