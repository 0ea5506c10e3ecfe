"""The training batch: what the loader produces and the model and losses consume."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    """Padded sequences plus the positions where each loss term reads.

    `frame_embeds` holds one row per `<image>` position, in order of (batch row, position): `image_mask.sum()`
    rows. Index tensors are `[N, 2]` of (batch row, position). LM targets are the ids at `*_index` positions; the
    loss reads the logits one position earlier (the shift). Decision weights are 1, or 0 for a negative dropped by
    negative subsampling (rho).
    """

    input_ids: torch.Tensor  # long [B, L], pad = tokenizer pad id
    attention_mask: torch.Tensor  # long [B, L]
    image_mask: torch.Tensor  # bool [B, L]
    frame_embeds: torch.Tensor  # float16 [N_image, H]
    update_index: torch.Tensor  # long [Nu, 2]
    update_labels: torch.Tensor  # float [Nu]
    update_weights: torch.Tensor  # float [Nu]
    speak_index: torch.Tensor  # long [Ns, 2]
    speak_labels: torch.Tensor  # float [Ns]
    speak_weights: torch.Tensor  # float [Ns]
    dst_index: torch.Tensor  # long [Nd, 2]
    response_index: torch.Tensor  # long [Nr, 2]
    summary_index: torch.Tensor | None = None  # long [Nm, 2]: progress-summary targets (summary variant)

    def __post_init__(self):
        if self.summary_index is None:  # every variant but `summary` has none
            self.summary_index = torch.zeros(0, 2, dtype=torch.long, device=self.response_index.device)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def pin_memory(self) -> Batch:
        """Called by a `DataLoader(pin_memory=True)` (a dataclass without it would silently stay in pageable
        memory)."""
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})
