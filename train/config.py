"""The resolved configuration of `dst train`: command-line options over a config file over defaults."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from train.losses import DECISION_LOSSES
from train.sequence import VARIANTS

PRECISIONS = ("auto", "fp16", "bf16", "fp32")


class TrainConfigError(ValueError):
    pass


@dataclass(frozen=True)
class TrainConfig:
    shards: Path
    model: str
    out: Path
    val_shards: Path | None = None
    max_steps: int = 1000
    seed: int = 0
    variant: str = "dst"  # dst (DST memory) | summary (ProAssist's progress summary) | none
    resume: bool = False
    lora: bool = True
    lora_rank: int = 16
    lora_alpha: int = 32
    load_in_4bit: bool = False
    precision: str = "auto"
    batch_size: str = "auto"  # tokens per micro-batch (padded), or "auto": the largest that fits memory_fraction
    memory_fraction: float = 0.9
    max_seq_len: int = 4096
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 50
    grad_clip: float = 1.0
    accumulation: int = 1
    decision_loss: str = "focal"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    rho: float = 1.0  # keep each negative decision with this probability, re-drawn every epoch
    w_upd: float = 1.0
    w_dst: float = 1.0
    w_spk: float = 1.0
    w_rsp: float = 1.0
    w_sum: float = 1.0  # the progress summary's LM loss (summary variant)
    positive_strength: float = 1.0
    dataset_weights: dict[str, float] = field(default_factory=dict)
    conversations_per_video: int | None = None
    frame_adapter: bool = True
    gradient_checkpointing: bool = False
    num_workers: int = 2
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 500
    keep_checkpoints: int = 3
    tensorboard: bool = False
    wandb: bool = False
    device: str = "auto"

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


_KNOWN = {f.name: f for f in fields(TrainConfig)}
_PATHS = {"shards", "val_shards", "out"}


def resolve(options: dict[str, Any], config_path: Path | None = None) -> TrainConfig:
    """Options (None = not given) over the `[train]` table of `config_path` over the defaults. Relative paths in
    the file are resolved against the file's folder."""
    values: dict[str, Any] = {}
    if config_path is not None:
        try:
            with open(config_path, "rb") as f:
                table = tomllib.load(f).get("train", {})
        except FileNotFoundError:
            raise TrainConfigError(f"config file {config_path} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise TrainConfigError(f"config file {config_path}: {exc}") from None
        unknown = set(table) - set(_KNOWN)
        if unknown:
            raise TrainConfigError(f"config file {config_path}: unknown [train] settings {sorted(unknown)}")
        values = {k: (config_path.parent / v if k in _PATHS else v) for k, v in table.items()}
    values.update({k: v for k, v in options.items() if v is not None})
    for key in ("shards", "model", "out"):
        if not values.get(key):
            raise TrainConfigError(f"--{key.replace('_', '-')} is required (or set it in the config file)")
    for key in _PATHS & set(values):
        values[key] = Path(values[key])
    cfg = TrainConfig(**values)
    _check(cfg)
    return cfg


def _check(cfg: TrainConfig) -> None:
    if cfg.precision not in PRECISIONS:
        raise TrainConfigError(f"--precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    if cfg.variant not in VARIANTS:
        raise TrainConfigError(f"--variant must be one of {VARIANTS}, got {cfg.variant!r}")
    if cfg.decision_loss not in DECISION_LOSSES:
        raise TrainConfigError(f"decision_loss must be one of {DECISION_LOSSES}, got {cfg.decision_loss!r}")
    if cfg.batch_size != "auto" and not (str(cfg.batch_size).isdigit() and int(cfg.batch_size) > 0):
        raise TrainConfigError(f"--batch-size must be 'auto' or a positive token budget, got {cfg.batch_size!r}")
    if not 0 < cfg.rho <= 1:
        raise TrainConfigError(f"rho must be in (0, 1], got {cfg.rho}")
    if not 0 < cfg.memory_fraction <= 1:
        raise TrainConfigError(f"--memory-fraction must be in (0, 1], got {cfg.memory_fraction}")
    if cfg.accumulation < 1 or cfg.max_steps < 1:
        raise TrainConfigError("accumulation and max_steps must be >= 1")
