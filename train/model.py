"""The multi-task model: SmolVLM2's text backbone and LM head fed stored frame embeddings, plus two decision heads.

Training never runs the vision tower: frame embeddings (already through the connector) replace the `<image>`
token embeddings via `inputs_embeds`, optionally through a small frame adapter that is the identity at start.
Decision A (DST update) and B (speak) are linear heads on the last hidden state at the positions the sequence
builder marks. The full SmolVLM model object is kept so checkpoints are ordinary Hugging Face folders.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from train.batch import Batch
from train.losses import shifted_positions

# LoRA on the text model only: a bare `q_proj` list would also hit the vision tower's projections.
LORA_TARGETS = r".*model\.text_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
HEADS_FILE = "heads.safetensors"


class FrameAdapter(nn.Module):
    """x + W2 gelu(W1 x), with W2 zero-initialised so the adapter starts as the identity."""

    def __init__(self, hidden: int):
        super().__init__()
        self.up = nn.Linear(hidden, hidden)
        self.down = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(x)))


class DSTModel(nn.Module):
    def __init__(self, vlm: nn.Module, frame_adapter: bool = True):
        super().__init__()
        self.vlm = vlm  # SmolVLMForConditionalGeneration, or a peft model wrapping it
        base = vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm
        self.text_model = base.model.text_model  # shares modules with self.vlm (LoRA layers included)
        self.lm_head = base.lm_head
        hidden = base.config.text_config.hidden_size
        self.update_head = nn.Linear(hidden, 1)
        self.speak_head = nn.Linear(hidden, 1)
        self.frame_adapter = FrameAdapter(hidden) if frame_adapter else None

    # --------------------------------------------------------------------------------------------- forward pieces

    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor, frame_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the `<image>` positions replaced by the (adapted) frame embeddings."""
        embeds = self.text_model.get_input_embeddings()(input_ids)
        if frame_embeds.shape[0] != int(image_mask.sum()):
            raise ValueError(
                f"{frame_embeds.shape[0]} frame embedding rows for {int(image_mask.sum())} <image> positions"
            )
        frames = frame_embeds.to(embeds.dtype)
        if self.frame_adapter is not None:
            frames = self.frame_adapter(frames).to(embeds.dtype)
        return embeds.masked_scatter(image_mask.unsqueeze(-1), frames)

    def hidden_states(
        self, input_ids, image_mask, frame_embeds, attention_mask=None, cache=None, position_ids=None
    ) -> tuple[torch.Tensor, object]:
        out = self.text_model(
            inputs_embeds=self.embed(input_ids, image_mask, frame_embeds),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state, out.cache

    def decision_logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(update, speak) logits for hidden states `[..., H]`."""
        return self.update_head(hidden).squeeze(-1), self.speak_head(hidden).squeeze(-1)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Logits at the positions each loss term reads. LM logits are taken one position before each target
        (the shift), and the LM head runs only there (a full [B, L, vocab] tensor would dominate memory)."""
        hidden, _ = self.hidden_states(
            batch.input_ids, batch.image_mask, batch.frame_embeds, attention_mask=batch.attention_mask
        )

        def at(index: torch.Tensor) -> torch.Tensor:
            return hidden[index[:, 0], index[:, 1]]

        def ids(index: torch.Tensor) -> torch.Tensor:
            return batch.input_ids[index[:, 0], index[:, 1]]

        return {
            "update": self.update_head(at(batch.update_index)).squeeze(-1),
            "speak": self.speak_head(at(batch.speak_index)).squeeze(-1),
            "dst_text": self.lm_head(at(shifted_positions(batch.dst_index))),
            "dst_text_targets": ids(batch.dst_index),
            "response": self.lm_head(at(shifted_positions(batch.response_index))),
            "response_targets": ids(batch.response_index),
            "summary": self.lm_head(at(shifted_positions(batch.summary_index))),
            "summary_targets": ids(batch.summary_index),
        }

    # --------------------------------------------------------------------------------------------- checkpoints

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Heads and adapter: trained in full under LoRA too, stored beside the Hugging Face folder."""
        state = {f"update_head.{k}": v for k, v in self.update_head.state_dict().items()}
        state |= {f"speak_head.{k}": v for k, v in self.speak_head.state_dict().items()}
        if self.frame_adapter is not None:
            state |= {f"frame_adapter.{k}": v for k, v in self.frame_adapter.state_dict().items()}
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def save(self, folder: Path, tokenizer) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.vlm.save_pretrained(folder / "model")  # a peft adapter under LoRA, the full model otherwise
        tokenizer.save_pretrained(folder / "model")
        save_file(self.extra_state(), str(folder / HEADS_FILE))

    def load_extra_state(self, folder: Path) -> None:
        state = load_file(str(folder / HEADS_FILE))
        for name in ("update_head", "speak_head", "frame_adapter"):
            part = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(name + ".")}
            module = getattr(self, name)
            if module is None:
                if part:
                    raise ValueError(f"{folder}: checkpoint has a {name} but the model was built without one")
                continue
            module.load_state_dict(part)


def wrap_lora(vlm: nn.Module, rank: int = 16, alpha: int = 32, dropout: float = 0.0) -> nn.Module:
    """peft LoRA on the text model's attention and MLP projections only."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none")
    with quiet_peft():
        return get_peft_model(vlm, config)


@contextmanager
def quiet_peft():
    """peft 0.21 calls an API transformers 5.24 renamed: a harmless FutureWarning that is not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def freeze_vision(vlm: nn.Module) -> None:
    """The vision tower and connector never run in training: keep them out of the optimizer."""
    base = vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm
    for module in (base.model.vision_model, base.model.connector):
        module.requires_grad_(False)
