"""`dst train`: set up, resume if asked, run the loop, leave a run folder.

RUN/config.json      resolved config, git commit, runtime (precision, world size), chosen token budget
RUN/metrics.jsonl    one line per logged step; validation lines with `val_` keys
RUN/checkpoints/     step-NNNNNN/ and last -> the newest (see train/checkpoint.py)
"""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta
from pathlib import Path

import torch
from rich.console import Console

from core.files import write_atomic
from core.runtime import Ranks, choose_device, process_group
from pipeline.shard_index import ShardIndex
from train.budget import resolve_token_budget
from train.build import (
    Runtime,
    build_model,
    build_optimizer,
    build_scaler,
    init_runtime,
)
from train.checkpoint import dst_meta, load_training_state, load_weights
from train.config import TrainConfig, TrainConfigError
from train.loader import Curriculum, TrainData
from train.loop import jsonl_logger, train_loop
from train.preemption import PREEMPTED, Preemption
from train.run_folder import set_aside, start_point
from train.sequence import SequenceFormat


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout (e.g. an installed copy): recorded as null
    return out.stdout.strip()


def _sinks(cfg: TrainConfig, run: Path) -> list:
    sinks = []
    if cfg.tensorboard:
        from torch.utils.tensorboard import (
            SummaryWriter,  # needs the tensorboard package
        )

        writer = SummaryWriter(str(run / "tensorboard"))
        sinks.append(
            lambda v: [
                writer.add_scalar(k, x, v["step"]) for k, x in v.items() if k != "step" and isinstance(x, (int, float))
            ]
        )
    if cfg.wandb:
        import wandb  # needs the wandb package and a login

        wandb.init(project="dst", dir=str(run), config=cfg.to_json())
        sinks.append(lambda v: wandb.log(v, step=v["step"]))
    return sinks


def check_shards(cfg: TrainConfig, index: ShardIndex, model, what: str) -> None:
    """The shards must come from the model being trained: same hidden size, and (unless allowed) the same --model
    name; `dst prepare`'s manifest and every sample record the model."""
    hidden = model.text_model.config.hidden_size
    if index.hidden_size != hidden:
        raise TrainConfigError(
            f"{what} {index.shards[0].parent} hold embeddings of hidden size {index.hidden_size} "
            f"(prepared with {index.model}), the model {cfg.model} has text hidden size {hidden}; "
            "prepare the shards with the same --model"
        )
    if index.model is not None and not cfg.allow_other_model and _model_name(index.model) != _model_name(cfg.model):
        raise TrainConfigError(
            f"{what} {index.shards[0].parent} were prepared with --model {index.model}, this run "
            f"trains {cfg.model}; use the same model (or allow_other_model = true if it is the "
            "same one under another name)"
        )


def _model_name(model: str) -> str:
    """A hub id and a local copy of it compare equal: `HuggingFaceTB/SmolVLM2-256M-Video-Instruct` and
    `/models/SmolVLM2-256M-Video-Instruct/`."""
    return Path(model.rstrip("/")).name.lower()


def run(cfg: TrainConfig, console: Console | None = None) -> Path:
    preemption = Preemption()  # first: a SIGTERM during set-up also ends the run cleanly
    try:
        ranks = Ranks.from_env()
        device = choose_device(cfg.device, ranks)
        # gradients are all-reduced every step: NCCL on GPUs, with a watchdog that stops a hung rank
        with process_group(ranks, device, "auto", timedelta(minutes=60)):
            return _run(cfg, console or Console(), preemption, init_runtime(cfg, ranks, device))
    finally:
        preemption.restore()


def _run(cfg: TrainConfig, console: Console, preemption: Preemption, runtime: Runtime) -> Path:
    if not runtime.is_main:
        console = Console(quiet=True)
    if runtime.is_main:  # first: a run that fails from here on must not be requeued by the job script
        (cfg.out / PREEMPTED).unlink(missing_ok=True)
    torch.manual_seed(cfg.seed)
    start = start_point(cfg.out, cfg.resume)

    index = ShardIndex.build(cfg.shards)
    for warning in index.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    model, tokenizer = build_model(cfg, runtime)
    check_shards(cfg, index, model, "the shards")
    fmt = SequenceFormat(tokenizer, index.tokens_per_frame, cfg.variant)
    budget = resolve_token_budget(cfg, runtime, model, fmt, index)
    if runtime.world > 1:  # every rank must pack the same batches: take the smallest budget any rank found
        shared = torch.tensor([budget], device=runtime.device)
        torch.distributed.all_reduce(shared, op=torch.distributed.ReduceOp.MIN)
        budget = int(shared.item())
    try:  # windows that cannot fit max_seq_len, too few batches for the ranks: a setting to change
        data = TrainData.from_config(index, fmt, cfg, budget, runtime.rank, runtime.world)
        if cfg.curriculum_steps:
            easy = TrainData.from_config(
                index,
                fmt,
                cfg,
                budget,
                runtime.rank,
                runtime.world,
                max_seq_len=cfg.curriculum_max_seq_len or cfg.max_seq_len // 4,
            )
            data = Curriculum(easy, data, cfg.curriculum_steps)
    except ValueError as exc:
        raise TrainConfigError(f"{cfg.shards}: {exc}") from None
    val_data = None
    if cfg.val_shards is not None:
        val_index = ShardIndex.build(cfg.val_shards)
        check_shards(cfg, val_index, model, "the validation shards")
        if val_index.tokens_per_frame != index.tokens_per_frame:
            raise TrainConfigError(
                f"the validation shards hold {val_index.tokens_per_frame} tokens per frame, the "
                f"training shards {index.tokens_per_frame}"
            )
        try:
            val_data = TrainData.from_config(
                val_index, fmt, cfg, budget, runtime.rank, runtime.world, validation=True
            ).batches_for_epoch(0)
        except ValueError as exc:
            raise TrainConfigError(f"{cfg.val_shards}: {exc}") from None
    optimizer, scheduler = build_optimizer(cfg, model)
    scaler = build_scaler(runtime)
    state = {"step": 0, "position": {"epoch": 0, "batch": 0}}
    if start.checkpoint is not None:
        load_weights(model, start.checkpoint)
        state = load_training_state(start.checkpoint, optimizer, scheduler, scaler)
        console.print(f"resumed from {start.checkpoint} at step {state['step']}")

    meta = dst_meta(cfg, index)
    if runtime.is_main:  # the inputs were accepted: only now is anything written
        cfg.out.mkdir(parents=True, exist_ok=True)
        for line in set_aside(cfg.out, start, state["step"]):
            console.print(line, highlight=False)
        write_atomic(
            cfg.out / "config.json",
            json.dumps(
                {
                    "config": cfg.to_json(),
                    "git_commit": git_commit(),
                    "precision": runtime.precision,
                    "world_size": runtime.world,
                    "device": str(runtime.device),
                    "token_budget": budget,
                    "steps_per_epoch": data.steps_per_epoch,
                    **{f"model_{k}": v for k, v in meta.items()},
                },
                indent=1,
            ),
        )
    if runtime.world > 1:  # the run folder exists before any rank writes to it
        torch.distributed.barrier()
    log = jsonl_logger(cfg.out / "metrics.jsonl", runtime.is_main, _sinks(cfg, cfg.out) if runtime.is_main else ())
    console.print(
        f"training {cfg.model}, variant {cfg.variant} ({'LoRA' if cfg.lora else 'full'}, "
        f"{runtime.precision}) on "
        f"{runtime.device} x{runtime.world}: {data.steps_per_epoch} micro-batches per epoch per rank, "
        f"{budget} tokens each",
        highlight=False,
        soft_wrap=True,
    )
    step = train_loop(
        cfg,
        runtime,
        model,
        tokenizer,
        data,
        val_data,
        optimizer,
        scheduler,
        scaler,
        state,
        log,
        console,
        meta,
        preemption,
    )
    console.print(f"done at step {step}: {cfg.out}", highlight=False)
    return cfg.out
