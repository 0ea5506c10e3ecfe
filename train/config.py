"""`dst train`'s settings, declared once (core/settings.py): command-line options over a config file over defaults.

The config file is TOML with a `[train]` table holding any of these settings; relative paths in it are resolved
against the file's folder.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.runtime import DEVICE_HELP
from core.settings import ConfigError, check, number_problem, setting
from train.variants import NAMES, get_variant

PRECISIONS = ("auto", "fp16", "bf16", "fp32")
DECISION_LOSSES = ("focal", "balanced_bce", "bce")


class TrainConfigError(ConfigError):
    pass


@dataclass(frozen=True)
class TrainConfig:
    shards: Path = setting(help="Training shards (dst prepare output).")
    model: str = setting(help="SmolVLM2 hub id, local folder, smollm2-135m or tiny-random (as in prepare).")
    out: Path = setting(help="Run folder.")
    val_shards: Path | None = setting(None, "Validation shards: losses and decision P/R/F1 every eval_every.")
    max_steps: int = setting(1000, "Optimizer steps.", minimum=1)
    seed: int = setting(0, "Seed for data order, sampling and head initialisation.", minimum=0, maximum=2**63 - 1)
    variant: str = setting(
        "dst",
        "dst (the DST is the memory), summary (ProAssist's progress summary) or none; saved with the checkpoint.",
        choices=NAMES,
    )
    resume: bool = setting(
        False, "Continue exactly from RUN/checkpoints/last; start from step 0 when there is none yet."
    )
    allow_other_model: bool = setting(False, "Train another --model than the shards were prepared with.")
    lora: bool = setting(True, "LoRA on the text model, or full fine-tuning.", flag="--lora/--full")
    lora_rank: int = setting(16, "LoRA rank.", minimum=1)
    lora_alpha: float = setting(32, "LoRA alpha.", minimum=0, above=True)
    load_in_4bit: bool = setting(False, "4-bit base weights (bitsandbytes, CUDA only).")
    precision: str = setting(
        "auto", "auto (bf16 on sm_80+, fp16 on older GPUs, fp32 on CPU), fp16, bf16, fp32.", choices=PRECISIONS
    )
    batch_size: str = setting(
        "auto", "Tokens per micro-batch (padded), or auto: the largest under memory_fraction of the GPU."
    )
    memory_fraction: float = setting(0.9, "GPU memory share for --batch-size auto.", minimum=0, maximum=1, above=True)
    max_seq_len: int = setting(4096, "Longest window in tokens.", minimum=1)
    lr: float = setting(2e-4, "Peak learning rate.", minimum=0, above=True)
    weight_decay: float = setting(0.0, "AdamW weight decay.", minimum=0)
    warmup_steps: int = setting(50, "Linear warm-up steps, then cosine to 10% of the peak.", minimum=0)
    grad_clip: float = setting(1.0, "Gradient norm clip.", minimum=0, above=True)
    accumulation: int = setting(1, "Micro-batches per optimizer step.", minimum=1)
    # balanced_bce since Study 2b (docs/experiments.md): at 2500 steps it led focal on every val column
    decision_loss: str = setting(
        "balanced_bce", "balanced_bce (ProAssist's, the default), focal or bce.", choices=DECISION_LOSSES
    )
    focal_alpha: float = setting(0.25, "Focal loss alpha (weight of the positive class).", minimum=0, maximum=1)
    focal_gamma: float = setting(2.0, "Focal loss gamma.", minimum=0)
    rho: float = setting(
        1.0, "Keep each negative decision with this probability (re-drawn per epoch).", minimum=0, maximum=1, above=True
    )
    w_upd: float = setting(1.0, "Weight of the DST update-decision loss.", minimum=0)
    w_dst: float = setting(1.0, "Weight of the DST text loss.", minimum=0)
    w_spk: float = setting(1.0, "Weight of the speaking-decision loss.", minimum=0)
    w_rsp: float = setting(1.0, "Weight of the response text loss.", minimum=0)
    w_sum: float = setting(1.0, "Weight of the progress-summary text loss (summary variant).", minimum=0)
    positive_strength: float = setting(1.0, "How much more often windows with positives are drawn.", minimum=0)
    dataset_weights: dict[str, float] = setting(
        help="Mixing weight per dataset (config file only).", cli=False, factory=dict
    )
    conversations_per_video: int | None = setting(
        None, "Conversations drawn per video and epoch (default: all).", minimum=1
    )
    curriculum_steps: int = setting(
        0,
        "Easy before hard: train the first this many steps (whole epochs) on short "
        "windows, then on windows of max_seq_len.",
        minimum=0,
    )
    curriculum_max_seq_len: int | None = setting(
        None, "Length of the curriculum's short windows (default: max_seq_len // 4).", minimum=1
    )
    frame_adapter: bool = setting(True, "A trained linear adapter on the stored frame embeddings.")
    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward pass (less memory).")
    num_workers: int = setting(2, "Data loader worker processes.", minimum=0)
    log_every: int = setting(10, "Steps between metrics.jsonl lines.", minimum=1)
    eval_every: int = setting(200, "Steps between validation passes.", minimum=1)
    save_every: int = setting(500, "Steps between checkpoints.", minimum=1)
    keep_checkpoints: int = setting(3, "Checkpoints kept (0: all).", minimum=0)
    tensorboard: bool = setting(False, "Also log to RUN/tensorboard (needs the tensorboard package).")
    wandb: bool = setting(False, "Also log to Weights & Biases (needs the wandb package and a login).")
    device: str = setting("auto", DEVICE_HELP + ".")

    def __post_init__(self):
        check(self, TrainConfigError)
        for name, weight in self.dataset_weights.items():
            problem = number_problem(f"dataset_weights.{name}", weight, 0)
            if problem:
                raise TrainConfigError(problem)
        used = get_variant(self.variant).loss_weights  # w_sum > 0 trains nothing in a dst model
        if all(getattr(self, name) == 0 for name in used):
            raise TrainConfigError(
                f"the loss weights {', '.join(used)} are all 0: nothing to train (variant {self.variant})"
            )
        if self.batch_size != "auto" and not (self.batch_size.isdigit() and int(self.batch_size) > 0):
            raise TrainConfigError(f"batch_size must be 'auto' or a positive token budget, got {self.batch_size!r}")

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


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
        unknown = set(table) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise TrainConfigError(f"config file {config_path}: unknown [train] settings {sorted(unknown)}")
        for key in _PATHS & set(table):
            if not isinstance(table[key], str):
                raise TrainConfigError(f"config file {config_path}: {key} must be a path string, got {table[key]!r}")
        values = {k: (config_path.parent / v if k in _PATHS else v) for k, v in table.items()}
    values.update({k: v for k, v in options.items() if v is not None})
    for key in ("shards", "model", "out"):
        if not values.get(key):
            raise TrainConfigError(f"--{key.replace('_', '-')} is required (or set it in the config file)")
    for key in _PATHS & set(values):
        values[key] = Path(values[key])
    if isinstance(values.get("batch_size"), int) and not isinstance(values["batch_size"], bool):
        values["batch_size"] = str(values["batch_size"])  # a token budget may be written as a number in TOML
    return TrainConfig(**values)
