"""Non-finite values in training: detect them, name the shard and sample, stop before anything is saved.

Design: the run stops (exit 1) rather than skipping and counting. `dst prepare` never writes a non-finite
embedding, so one in the inputs means a corrupt shard, which preparing again fixes; skipping it would silently change
the data (and, under DDP, the ranks' batches would no longer match). A non-finite loss or gradient from finite inputs
means the run itself diverged (learning rate, or an fp16 overflow in the forward pass): continuing would write NaN
weights. With fp16 and a GradScaler, infinite gradients are expected now and then: the scaler skips that step and
lowers its scale, so gradients are only checked here when there is no scaler.

Checks record the first problem of a step and `stop_if_any` raises on every rank together (under DDP a rank that
stopped alone would leave the others waiting in a collective); the description is built only on failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from core.errors import DataError

Windows = Callable[[], list]  # the Windows of a micro-batch, computed only when a message needs them
NAMED_SAMPLES = 3  # samples listed in a message about a whole batch


class NonFiniteError(DataError):
    """Training met NaN or inf; the message names the step, shard file and sample. Nothing was saved."""


def describe_batch(index, windows: list) -> str:
    shown = "; ".join(f"{index.describe(w.video_id)} rows {w.start}-{w.end - 1}" for w in windows[:NAMED_SAMPLES])
    more = len(windows) - NAMED_SAMPLES
    return shown + (f" and {more} more" if more > 0 else "")


def nonfinite_inputs(index, windows: list) -> str:
    """Which sample of a batch holds the non-finite embeddings, and where."""
    for w in windows:
        rows = index.rows(w.video_id, w.start, w.end)
        finite = np.isfinite(rows).reshape(len(rows), -1).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite) + w.start
            return (
                f"non-finite frame embeddings in {index.describe(w.video_id)} (video "
                f"{index.meta(w.video_id).video_uid}): {len(bad)} rows, first row {int(bad[0])}; the shard is "
                "corrupt (dst prepare never writes such values): prepare it again"
            )
    return f"non-finite frame embeddings in a batch of {describe_batch(index, windows)}"


class NonFiniteGuard:
    """Checks of one run; `problem` holds the first finding until `stop_if_any` raises it."""

    def __init__(self, index):
        self.index = index
        self.problem: str | None = None

    def inputs(self, batch, windows: Windows, what: str, index=None) -> None:
        """`index`: the shards the batch came from (default: the training shards)."""
        if self.problem is None and not bool(torch.isfinite(batch.frame_embeds).all()):
            self.problem = f"{what}: {nonfinite_inputs(index or self.index, windows())}"

    def loss(self, values: dict[str, float], windows: Windows, step: int) -> None:
        bad = [name for name, value in values.items() if not np.isfinite(value)]
        if self.problem is None and bad:
            self.problem = (
                f"step {step}: non-finite {', '.join(bad)} loss from finite inputs, in a batch of "
                f"{describe_batch(self.index, windows())}; the run diverged (lower the learning rate; "
                "with fp16 an activation may have overflowed: try --precision bf16 or fp32)"
            )

    def stop_if_any(self, runtime) -> None:
        """Raise `NonFiniteError` on every rank when any rank found a problem (one all-reduce under DDP)."""
        found = self.problem is not None
        if runtime.world > 1:
            flag = torch.tensor([float(found)], device=runtime.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            found = bool(flag.item())
        if found:
            raise NonFiniteError(
                self.problem
                or f"rank {runtime.rank}: another rank met non-finite values (its message names the sample); stopped"
            )

    def gradients(self, norm: torch.Tensor, scaler, windows: Windows, step: int) -> None:
        """Without a GradScaler, a non-finite gradient norm stops the run before the optimizer step. The norm is
        computed after DDP's all-reduce, so every rank sees the same value and raises together."""
        if scaler is None and not bool(torch.isfinite(norm)):
            raise NonFiniteError(
                f"step {step}: non-finite gradients (norm {float(norm)}) from finite inputs and "
                f"loss, in a batch of {describe_batch(self.index, windows())}; the step was not "
                "applied (lower the learning rate)"
            )

    def checked(self, batches, what: str) -> Iterator:
        """Validation batches (an `EpochBatches`), with their inputs checked; call `stop_if_any` after the pass."""
        for i in range(len(batches)):
            batch = batches[i]
            self.inputs(batch, lambda i=i: batches.batches[batches.start + i], what, batches.index)
            yield batch


def check_weights(params: Iterable[tuple[str, torch.Tensor]], step: int, last: str) -> None:
    """Refuse to save non-finite weights (the newest good checkpoint stays `last`, and nothing is pruned)."""
    for name, param in params:
        if not bool(torch.isfinite(param).all()):
            raise NonFiniteError(
                f"step {step}: non-finite weights in {name}: no checkpoint written (the last good one, {last}, is kept)"
            )
