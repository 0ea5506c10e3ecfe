"""Incremental forward over one streamed sequence with a KV cache: the inference path of the model.

Training and streaming share the sequence builder (train/sequence.py); this class only appends ids (and the frame
embeddings of their `<image>` positions) to a `DynamicCache` and returns the last hidden state, from which the
decision heads and the LM head read.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from train.model import DSTModel
from train.sequence import SequenceFormat


class StreamSession:
    def __init__(self, model: DSTModel, fmt: SequenceFormat, device: torch.device | str = "cpu"):
        self.model, self.fmt, self.device = model, fmt, torch.device(device)
        self.reset()

    def reset(self) -> None:
        self.cache = DynamicCache()
        self.ids: list[int] = []

    @property
    def length(self) -> int:
        return len(self.ids)

    @torch.no_grad()
    def feed(self, ids: list[int], frame_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Append `ids`; `frame_embeds` holds one row per `<image>` id among them. Returns the last hidden state."""
        input_ids = torch.tensor([ids], device=self.device)
        image_mask = input_ids == self.fmt.image_id
        if frame_embeds is None:
            frame_embeds = torch.zeros(0, self.model.lm_head.in_features, device=self.device)
        positions = torch.arange(self.length, self.length + len(ids), device=self.device)[None]
        hidden, self.cache = self.model.hidden_states(input_ids, image_mask, frame_embeds.to(self.device),
                                                      cache=self.cache, position_ids=positions)
        self.ids += ids
        return hidden[0, -1]

    @torch.no_grad()
    def decisions(self, hidden: torch.Tensor) -> tuple[float, float]:
        """(p_update, p_speak) from a hidden state."""
        update, speak = self.model.decision_logits(hidden.to(self.model.update_head.weight.dtype))
        return float(torch.sigmoid(update)), float(torch.sigmoid(speak))

    @torch.no_grad()
    def next_token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)
