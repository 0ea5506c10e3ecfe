"""Everything `dst train` builds before its loop: device and precision, model, optimizer, schedule, distributed."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from core.runtime import Ranks
from pipeline.models import load_model
from train.config import TrainConfig, TrainConfigError
from train.model import DSTModel, freeze_vision, wrap_lora


@dataclass(frozen=True)
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    precision: str  # "fp32", "fp16" (GradScaler) or "bf16"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)


def resolve_precision(requested: str, device: torch.device) -> str:
    """auto: bf16 on GPUs that have it (sm_80+), fp16 with a GradScaler on older ones (Turing), fp32 on CPU."""
    if device.type != "cuda":
        if requested in ("fp16", "bf16"):
            raise TrainConfigError(f"--precision {requested} needs a CUDA GPU; on CPU use fp32 (or auto)")
        return "fp32"
    bf16 = torch.cuda.get_device_capability(device)[0] >= 8
    if requested == "auto":
        return "bf16" if bf16 else "fp16"
    if requested == "bf16" and not bf16:
        raise TrainConfigError(
            f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 (sm_80+ needed); use fp16"
        )
    return requested


def init_runtime(cfg: TrainConfig, ranks: Ranks, device: torch.device) -> Runtime:
    return Runtime(ranks.rank, ranks.world, ranks.local_rank, device, resolve_precision(cfg.precision, device))


def build_model(cfg: TrainConfig, runtime: Runtime) -> tuple[DSTModel, object]:
    """The base model (fp32 master weights; autocast does the fp16/bf16 compute), LoRA or full, vision frozen."""
    if cfg.load_in_4bit:
        if runtime.device.type != "cuda":
            raise TrainConfigError("--load-in-4bit needs CUDA (bitsandbytes); this run has no GPU")
        if not cfg.lora:
            raise TrainConfigError("--load-in-4bit trains LoRA adapters only; drop --full")
        from peft import prepare_model_for_kbit_training

        vlm, tokenizer = load_model(cfg.model, device=runtime.device, load_in_4bit=True)
        # freezes the base and casts its weights that stay in fp16 (norms, embeddings) to fp32 master weights
        vlm = prepare_model_for_kbit_training(vlm, use_gradient_checkpointing=cfg.gradient_checkpointing)
    else:
        vlm, tokenizer = load_model(cfg.model)
    freeze_vision(vlm)
    if cfg.gradient_checkpointing:
        vlm.model.text_model.gradient_checkpointing_enable()
    if cfg.lora:
        vlm = wrap_lora(vlm, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    torch.manual_seed(cfg.seed)  # heads and adapter initialise the same on every rank and every run
    model = DSTModel(vlm, frame_adapter=cfg.frame_adapter).to(runtime.device)
    model.train()
    return model, tokenizer


def build_optimizer(cfg: TrainConfig, model: DSTModel):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    def schedule(step: int) -> float:  # linear warmup, then cosine to 10% of the peak
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def build_scaler(runtime: Runtime):
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    return torch.amp.GradScaler("cuda") if runtime.precision == "fp16" else None
