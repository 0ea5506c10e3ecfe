"""Losses: exact values against hand computations, fp16 robustness, weights, the LM shift, rho subsampling, the
weighted total."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from train.losses import (
    LossWeights,
    balanced_bce,
    bce,
    combine,
    decision_loss,
    focal_loss,
    lm_loss,
    negative_keep_mask,
    shifted_positions,
)

LOGITS = torch.tensor([2.0, -1.0, 0.5, -3.0, 0.0, 1.5])
TARGETS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
DECISION_LOSSES = (focal_loss, balanced_bce, bce)


def bce_math(x: float, t: float) -> float:
    p = 1 / (1 + math.exp(-x))
    return -math.log(p) if t == 1 else -math.log(1 - p)


def focal_math(x: float, t: float, alpha: float, gamma: float) -> float:
    p = 1 / (1 + math.exp(-x))
    p_t = p if t == 1 else 1 - p
    alpha_t = alpha if t == 1 else 1 - alpha
    return -alpha_t * (1 - p_t) ** gamma * math.log(p_t)


# ----------------------------------------------------------------------------------------------- decision losses


def test_focal_gamma0_alpha_half_is_half_bce():
    # gamma=0 removes the modulating factor and alpha=0.5 makes alpha_t = 0.5 for both classes: exactly 0.5 * BCE.
    assert torch.equal(focal_loss(LOGITS, TARGETS, alpha=0.5, gamma=0.0), 0.5 * bce(LOGITS, TARGETS))
    assert torch.equal(bce(LOGITS, TARGETS), F.binary_cross_entropy_with_logits(LOGITS, TARGETS))


def test_focal_matches_hand_computation():
    x, t = [1.2, -0.4, 0.8], [1.0, 0.0, 0.0]
    expected = sum(focal_math(a, b, 0.25, 2.0) for a, b in zip(x, t)) / 3
    got = focal_loss(torch.tensor(x), torch.tensor(t), alpha=0.25, gamma=2.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_focal_defaults_are_alpha_quarter_gamma_two():
    assert torch.equal(focal_loss(LOGITS, TARGETS), focal_loss(LOGITS, TARGETS, alpha=0.25, gamma=2.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", DECISION_LOSSES)
def test_extreme_low_precision_logits_stay_finite(loss, dtype):
    # fp16 saturates at 65504 and overflows to inf; the loss casts to fp32 and clamps, so nothing becomes NaN.
    raw = [60000.0, -60000.0, 1e4, -1e4, float("inf"), float("-inf"), 0.0, 30.0]
    logits = torch.tensor(raw, dtype=dtype, requires_grad=True)
    targets = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0], dtype=dtype)
    value = loss(logits, targets)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert torch.isfinite(logits.grad.float()).all()


def test_focal_is_zero_for_confidently_right_extreme_logits():
    logits = torch.tensor([60000.0, -60000.0], dtype=torch.float16)
    assert focal_loss(logits, torch.tensor([1.0, 0.0])).item() == 0.0


def test_focal_gamma_below_one_has_finite_grad_when_saturated():
    # (1 - p_t)^gamma has an infinite derivative at 0 for gamma < 1; the loss must not turn that into NaN.
    logits = torch.tensor([100.0, -100.0, 0.3], requires_grad=True)
    focal_loss(logits, torch.tensor([1.0, 0.0, 1.0]), gamma=0.5).backward()
    assert torch.isfinite(logits.grad).all()


def test_balanced_bce_is_mean_of_class_means():
    pos = [bce_math(x, 1) for x, t in zip(LOGITS.tolist(), TARGETS.tolist()) if t == 1]
    neg = [bce_math(x, 0) for x, t in zip(LOGITS.tolist(), TARGETS.tolist()) if t == 0]
    expected = (sum(pos) / len(pos) + sum(neg) / len(neg)) / 2
    assert balanced_bce(LOGITS, TARGETS).item() == pytest.approx(expected, rel=1e-6)


def test_balanced_bce_with_one_class_is_that_class_mean():
    x = torch.tensor([0.3, -2.0, 1.1])
    only_pos = sum(bce_math(v, 1) for v in x.tolist()) / 3
    only_neg = sum(bce_math(v, 0) for v in x.tolist()) / 3
    assert balanced_bce(x, torch.ones(3)).item() == pytest.approx(only_pos, rel=1e-6)
    assert balanced_bce(x, torch.zeros(3)).item() == pytest.approx(only_neg, rel=1e-6)
    # A class present only with weight 0 counts as absent.
    assert balanced_bce(x, torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(
        (bce_math(0.3, 1) + bce_math(-2.0, 1)) / 2, rel=1e-6
    )


@pytest.mark.parametrize("loss", DECISION_LOSSES)
def test_weight_zero_position_changes_nothing(loss):
    keep = torch.tensor([True, True, False, True, True, True])
    logits = LOGITS.clone().requires_grad_(True)
    value = loss(logits, TARGETS, keep.float())
    value.backward()
    assert value.item() == pytest.approx(loss(LOGITS[keep], TARGETS[keep]).item(), rel=1e-6)
    assert logits.grad[2].item() == 0.0  # exactly 0, not just small
    # Even an overflowed logit at a weight-0 position is inert.
    poisoned = LOGITS.clone()
    poisoned[2] = float("inf")
    assert loss(poisoned, TARGETS, keep.float()).item() == pytest.approx(value.item(), rel=1e-6)


@pytest.mark.parametrize("loss", DECISION_LOSSES)
def test_weight_two_equals_duplicating_the_position(loss):
    weights = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    dup = torch.tensor([0, 1, 1, 2, 3, 4, 5])
    assert loss(LOGITS, TARGETS, weights).item() == pytest.approx(loss(LOGITS[dup], TARGETS[dup]).item(), rel=1e-6)


@pytest.mark.parametrize("loss", DECISION_LOSSES)
@pytest.mark.parametrize("n", [0, 3])
def test_no_positions_gives_zero_with_working_backward(loss, n):
    logits = torch.randn(n, requires_grad=True)
    value = loss(logits, torch.ones(n), torch.zeros(n))
    assert value.item() == 0.0 and value.grad_fn is not None
    value.backward()
    assert torch.equal(logits.grad, torch.zeros(n))


def test_decision_loss_dispatch():
    assert torch.equal(
        decision_loss("focal", LOGITS, TARGETS, alpha=0.4, gamma=1.0), focal_loss(LOGITS, TARGETS, alpha=0.4, gamma=1.0)
    )
    assert torch.equal(decision_loss("balanced_bce", LOGITS, TARGETS), balanced_bce(LOGITS, TARGETS))
    assert torch.equal(decision_loss("bce", LOGITS, TARGETS), bce(LOGITS, TARGETS))
    with pytest.raises(ValueError):
        decision_loss("mse", LOGITS, TARGETS)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-50, 50), st.booleans()), min_size=1, max_size=20),
    st.floats(0.05, 0.95),
    st.floats(0.0, 4.0),
)
def test_focal_bounded_by_scaled_bce(items, alpha, gamma):
    # The modulating factor lies in [0, 1], so 0 <= focal <= max(alpha, 1 - alpha) * BCE.
    x = torch.tensor([v for v, _ in items])
    t = torch.tensor([float(b) for _, b in items])
    value = focal_loss(x, t, alpha=alpha, gamma=gamma).item()
    assert 0.0 <= value <= max(alpha, 1 - alpha) * bce(x, t).item() * (1 + 1e-5) + 1e-12


# ----------------------------------------------------------------------------------------------- LM loss


def test_shifted_positions_shifts_by_exactly_one():
    index = torch.tensor([[0, 5], [1, 1], [3, 9]])
    assert torch.equal(shifted_positions(index), torch.tensor([[0, 4], [1, 0], [3, 8]]))
    assert shifted_positions(torch.zeros(0, 2, dtype=torch.long)).shape == (0, 2)
    with pytest.raises(ValueError):
        shifted_positions(torch.tensor([[0, 0]]))


def test_lm_loss_is_cross_entropy_of_the_previous_positions():
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 11, (2, 6), generator=gen)
    logits = torch.randn(2, 6, 11, generator=gen).to(torch.bfloat16)
    targets = torch.tensor([[0, 3], [0, 4], [1, 1]])
    prev = shifted_positions(targets)
    value = lm_loss(logits[prev[:, 0], prev[:, 1]], input_ids[targets[:, 0], targets[:, 1]])
    # The token at position p is predicted by the logits at p - 1.
    expected = F.cross_entropy(logits.float()[[0, 0, 1], [2, 3, 0]], input_ids[[0, 0, 1], [3, 4, 1]])
    assert value.dtype == torch.float32
    assert torch.equal(value, expected)


def test_lm_loss_empty_is_zero_with_working_backward():
    logits = torch.randn(0, 11, requires_grad=True)
    value = lm_loss(logits, torch.zeros(0, dtype=torch.long))
    assert value.item() == 0.0
    value.backward()
    assert logits.grad.shape == (0, 11)


# ----------------------------------------------------------------------------------------------- rho subsampling


def mask(labels: torch.Tensor, rho: float, seed: int) -> torch.Tensor:
    return negative_keep_mask(labels, rho, torch.Generator().manual_seed(seed))


LABELS = (torch.arange(1000) % 7 == 0).float()  # 143 positives, 857 negatives


@pytest.mark.parametrize("rho", [0.0, 0.1, 0.5, 1.0])
def test_positives_always_kept(rho):
    weights = mask(LABELS, rho, seed=3)
    assert weights.dtype == torch.float32
    assert (weights[LABELS == 1] == 1).all()


def test_rho_one_keeps_all_and_rho_zero_drops_all_negatives():
    assert (mask(LABELS, 1.0, seed=3) == 1).all()
    assert torch.equal(mask(LABELS, 0.0, seed=3), LABELS)


def test_mask_reproducible_per_seed_and_redrawn_per_epoch():
    assert torch.equal(mask(LABELS, 0.5, seed=7), mask(LABELS, 0.5, seed=7))
    assert not torch.equal(mask(LABELS, 0.5, seed=7), mask(LABELS, 0.5, seed=8))  # P(equal) = 2^-857


def test_kept_fraction_of_negatives_near_rho():
    # 10000 negatives: the kept fraction's std is sqrt(rho(1-rho)/N) = 0.003 at rho=0.1; 0.015 is 5 std.
    weights = mask(torch.zeros(10000), 0.1, seed=11)
    assert abs(weights.mean().item() - 0.1) < 0.015


def test_rho_out_of_range_rejected():
    with pytest.raises(ValueError):
        mask(LABELS, 1.5, seed=0)


# ----------------------------------------------------------------------------------------------- total


def test_combine_respects_weights_exactly():
    terms = {
        "update": torch.tensor(1.0),
        "dst_text": torch.tensor(10.0),
        "speak": torch.tensor(100.0),
        "response": torch.tensor(1000.0),
        "summary": torch.tensor(10000.0),
    }
    assert combine(terms, LossWeights()).item() == 11111.0
    assert (
        combine(terms, LossWeights(w_upd=2.0, w_dst=0.5, w_spk=0.0, w_rsp=3.0, w_sum=0.25)).item()
        == 2.0 + 5.0 + 3000.0 + 2500.0
    )
    with pytest.raises(ValueError):
        combine({k: v for k, v in terms.items() if k != "speak"}, LossWeights())


def test_loss_weights_frozen():
    with pytest.raises(AttributeError):
        LossWeights().w_upd = 2.0  # type: ignore[misc]
