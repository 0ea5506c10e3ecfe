"""`dst train`: set up, resume if asked, run the loop, leave a run folder.

    RUN/config.json      resolved config, git commit, runtime (precision, world size), chosen token budget
    RUN/metrics.jsonl    one line per logged step; validation lines with `val_` keys
    RUN/checkpoints/     step-NNNNNN/ and last -> the newest (see train/checkpoint.py)
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch
from rich.console import Console

from train.budget import resolve_token_budget
from train.checkpoint import load_training_state, load_weights
from train.config import TrainConfig, TrainConfigError
from train.loader import TrainData
from train.loop import jsonl_logger, train_loop
from train.sequence import SequenceFormat
from train.setup import build_model, build_optimizer, build_scaler, init_runtime
from train.shard_index import ShardIndex


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout (e.g. an installed copy): recorded as null
    return out.stdout.strip()


def _sinks(cfg: TrainConfig, run: Path) -> list:
    sinks = []
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        writer = SummaryWriter(str(run / "tensorboard"))
        sinks.append(lambda v: [writer.add_scalar(k, x, v["step"]) for k, x in v.items()
                                if k != "step" and isinstance(x, (int, float))])
    if cfg.wandb:
        import wandb  # needs the wandb package and a login

        wandb.init(project="dst", dir=str(run), config=cfg.to_json())
        sinks.append(lambda v: wandb.log(v, step=v["step"]))
    return sinks


def check_shards_fit_variant(index: ShardIndex, where: Path, variant: str) -> None:
    """The summary variant learns from ProAssist's progress summaries, which shards prepared before they were kept
    do not hold."""
    if variant != "summary":
        return
    old = [v for v in index.video_ids if any("progress" not in c for c in index.meta(v)["labels"]["conversations"])]
    if old:
        raise TrainConfigError(f"{where}: {len(old)} of {len(index)} videos (e.g. {old[0]}) have no progress "
                               "summaries (prepared before dst prepare kept them); run dst prepare again to train "
                               "the summary variant, or train --variant dst / none on these shards")


def run(cfg: TrainConfig, console: Console | None = None) -> Path:
    console = console or Console()
    runtime = init_runtime(cfg)
    if not runtime.is_main:
        console = Console(quiet=True)
    torch.manual_seed(cfg.seed)
    last = cfg.out / "checkpoints" / "last"
    if cfg.resume and not last.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {last}")
    if not cfg.resume and (cfg.out / "metrics.jsonl").exists():
        raise FileExistsError(f"{cfg.out} already holds a run; pass --resume to continue it or pick another --out")
    cfg.out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = build_model(cfg, runtime)
    index = ShardIndex.build(cfg.shards)
    check_shards_fit_variant(index, cfg.shards, cfg.variant)
    fmt = SequenceFormat(tokenizer, index.tokens_per_frame, cfg.variant)
    budget = resolve_token_budget(cfg, runtime, model, fmt, index.hidden_size)
    if runtime.world > 1:  # every rank must pack the same batches: take the smallest budget any rank found
        shared = torch.tensor([budget], device=runtime.device)
        torch.distributed.all_reduce(shared, op=torch.distributed.ReduceOp.MIN)
        budget = int(shared.item())
    data = TrainData.from_config(index, fmt, cfg, budget, runtime.rank, runtime.world)
    val_data = None
    if cfg.val_shards is not None:
        val_index = ShardIndex.build(cfg.val_shards)
        check_shards_fit_variant(val_index, cfg.val_shards, cfg.variant)
        val_data = TrainData.from_config(val_index, fmt, cfg, budget, runtime.rank, runtime.world,
                                         validation=True).batches_for_epoch(0)
    optimizer, scheduler = build_optimizer(cfg, model)
    scaler = build_scaler(runtime)
    state = {"step": 0, "position": {"epoch": 0, "batch": 0}}
    if cfg.resume:
        folder = last.resolve()
        load_weights(model, folder)
        state = load_training_state(folder, optimizer, scheduler, scaler)
        console.print(f"resumed from {folder} at step {state['step']}")

    dst_meta = {"base_model": cfg.model, "variant": cfg.variant, "lora": cfg.lora, "frame_adapter": cfg.frame_adapter,
                "tokens_per_frame": index.tokens_per_frame, "hidden_size": index.hidden_size,
                "max_seq_len": cfg.max_seq_len}
    if runtime.is_main:
        (cfg.out / "config.json").write_text(json.dumps({
            "config": cfg.to_json(), "git_commit": git_commit(), "precision": runtime.precision,
            "world_size": runtime.world, "device": str(runtime.device), "token_budget": budget,
            "steps_per_epoch": data.steps_per_epoch, **{f"model_{k}": v for k, v in dst_meta.items()},
        }, indent=1))
    log = jsonl_logger(cfg.out / "metrics.jsonl", runtime.is_main, _sinks(cfg, cfg.out) if runtime.is_main else ())
    console.print(f"training {cfg.model}, variant {cfg.variant} ({'LoRA' if cfg.lora else 'full'}, "
                  f"{runtime.precision}) on "
                  f"{runtime.device} x{runtime.world}: {data.steps_per_epoch} micro-batches per epoch per rank, "
                  f"{budget} tokens each", highlight=False, soft_wrap=True)
    step = train_loop(cfg, runtime, model, tokenizer, data, val_data, optimizer, scheduler, scaler, state, log,
                      console, dst_meta)
    if runtime.world > 1:
        torch.distributed.destroy_process_group()
    console.print(f"done at step {step}: {cfg.out}", highlight=False)
    return cfg.out
