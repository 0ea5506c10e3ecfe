"""Watching mixed-precision training: GradScaler's skipped steps, non-finite forwards, and the layer that overflowed.

Under fp16 an activation above 65,504 becomes inf. GradScaler handles *gradient* overflow (it skips the step and
halves the scale), but not a *forward* overflow: the loss is non-finite whatever the scale, every step is skipped,
and the run silently stops learning. So the loop reports both, in every metrics.jsonl line:

- `skipped_steps`: optimizer steps GradScaler skipped (its scale went down; the learning-rate schedule waits
  for them too), and `loss_scale` (fp16 only);
- `nonfinite_forwards`: micro-batches whose loss was not finite.

When a micro-batch's loss is not finite, it is run again (no grad) with forward hooks on every module of the
language model, the frame adapter and the heads, and the run stops with `ActivationOverflow` naming the first
module whose output was not finite and the largest finite activation before it. When nothing goes wrong the cost
is one `isfinite` on the loss per micro-batch (the loop reads the loss terms anyway).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from core.errors import DataError

FP16_MAX = 65504.0


class ActivationOverflow(DataError):
    """A forward pass produced non-finite activations; loss scaling cannot help."""


@dataclass(frozen=True)
class Overflow:
    module: str  # the first module (in execution order) whose output was not finite
    largest_before: float  # the largest finite |activation| of any module output before it
    largest_before_at: str

    @property
    def layer(self) -> int | None:
        found = re.search(r"layers\.(\d+)", self.module)
        return int(found.group(1)) if found else None


def _tensors(output):
    if torch.is_tensor(output):
        yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            if torch.is_tensor(item):
                yield item
    elif hasattr(output, "last_hidden_state") and torch.is_tensor(output.last_hidden_state):
        yield output.last_hidden_state


def watched_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """The language model's modules (embeddings, every decoder layer and its attention/MLP parts, final norm), the
    frame adapter, the decision heads and the LM head, with short names (`text_model.layers.3.mlp.down_proj`)."""
    named = list(model.text_model.named_modules(prefix="text_model"))
    for name in ("frame_adapter", "update_head", "speak_head", "lm_head"):
        module = getattr(model, name, None)
        if module is not None:
            named += list(module.named_modules(prefix=name))
    return named


@torch.no_grad()
def first_nonfinite_module(model, batch, autocast) -> Overflow | None:
    """Run `batch` through `model` (a DSTModel) under `autocast` with hooks; the first module whose output is not
    finite, or None when the whole forward is finite."""
    found: list[Overflow] = []
    largest = [0.0, ""]

    def hook(name):
        def check(module, inputs, output):
            if found:
                return
            for tensor in _tensors(output):
                if not tensor.is_floating_point() or tensor.numel() == 0:
                    continue
                if not bool(torch.isfinite(tensor).all()):
                    found.append(Overflow(name, largest[0], largest[1]))
                    return
                peak = float(tensor.detach().abs().max())
                if peak > largest[0]:
                    largest[:] = [peak, name]

        return check

    handles = [module.register_forward_hook(hook(name)) for name, module in watched_modules(model)]
    try:
        with autocast():
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


class TrainingMonitor:
    """Counts for metrics.jsonl and the stop on activation overflow (see module doc); one per `train_loop`."""

    def __init__(self, model, scaler, runtime, counters: dict | None = None):
        self.model, self.scaler, self.runtime = model, scaler, runtime
        counters = counters or {}  # a resumed run goes on counting from its checkpoint's `counters()`
        self.skipped_steps = int(counters.get("skipped_steps", 0))
        self.nonfinite_forwards = int(counters.get("nonfinite_forwards", 0))
        self.overflow: Overflow | None = None  # None with a non-finite loss: the loss itself overflowed (counted)
        self.where = (0, 0)  # (step, micro-batch) of the overflow
        self._scale = scaler.get_scale() if scaler is not None else None

    def check_forward(self, loss: torch.Tensor, batch, step: int, micro_batch: int) -> None:
        """After a micro-batch's forward: count a non-finite loss and find the module that overflowed."""
        if bool(torch.isfinite(loss.detach())):
            return
        self.nonfinite_forwards += 1
        if self.overflow is None:
            self.overflow = first_nonfinite_module(self.model, batch, self.runtime.autocast)
            self.where = (step + 1, micro_batch)

    def stop_if_overflowed(self) -> None:
        """Before the optimizer step: raise `ActivationOverflow` on every rank if any rank saw one."""
        flag = torch.tensor([float(self.overflow is not None)], device=self.runtime.device)
        if self.runtime.world > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if not bool(flag.item()):
            return
        if self.overflow is None:
            raise ActivationOverflow(
                f"rank {self.runtime.rank}: another rank's forward produced non-finite "
                "activations (its message names the module); stopping every rank"
            )
        o = self.overflow
        layer = f" (decoder layer {o.layer})" if o.layer is not None else ""
        before = (
            f"; the largest finite activation before it was {o.largest_before:,.0f} in {o.largest_before_at}"
            if o.largest_before_at
            else ""
        )
        raise ActivationOverflow(
            f"step {self.where[0]}, micro-batch {self.where[1]}: the forward under {self.runtime.precision} produced "
            f"non-finite activations, first in {o.module}{layer}{before} (fp16 holds up to {FP16_MAX:,.0f}). "
            "Loss scaling cannot fix a forward overflow: train in bf16 or fp32 (--precision), lower the learning "
            "rate, or resume from an earlier checkpoint."
        )

    def after_optimizer_step(self) -> bool:
        """After `scaler.update()`: whether GradScaler skipped the optimizer step. The scale goes down only when it
        found inf/NaN gradients and skipped (the usual test: `optimizer.step` reports nothing)."""
        if self.scaler is None:
            return False
        scale = self.scaler.get_scale()
        skipped = scale < self._scale
        self.skipped_steps += skipped
        self._scale = scale
        return skipped

    def counters(self) -> dict[str, int]:
        """What a checkpoint keeps, so that a resumed run's counts are the whole run's."""
        return {"skipped_steps": self.skipped_steps, "nonfinite_forwards": self.nonfinite_forwards}

    def metrics(self) -> dict[str, float]:
        values: dict[str, float] = {"nonfinite_forwards": self.nonfinite_forwards}
        if self.scaler is not None:
            values |= {"skipped_steps": self.skipped_steps, "loss_scale": float(self._scale)}
        return values
