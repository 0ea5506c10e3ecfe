"""The training loop: accumulation, mixed precision, DDP, logging, validation, checkpoints, SIGTERM."""

from __future__ import annotations

import contextlib
import json
import signal
import time

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from train.checkpoint import save_checkpoint
from train.fp16_monitor import TrainingMonitor
from train.losses import LOSS_WEIGHT_NAMES, TERMS
from train.step import global_counts, loss_terms, loss_weights, scaled_loss, validate


def micro_batches(data, epoch: int, start: int, workers: int):
    """(epoch, index in epoch, Batch) forever, from a data position; each epoch is a fresh deterministic draw."""
    while True:
        batches = data.batches_for_epoch(epoch, start=start)
        loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=workers)
        for i, batch in enumerate(loader, start):
            yield epoch, i, batch
        epoch, start = epoch + 1, 0


class Preemption:
    """SIGTERM (a cluster preempting the job) sets a flag; the loop saves a checkpoint and stops."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def requested_anywhere(self, runtime) -> bool:
        """Under DDP every rank must stop at the same step, even if only one got the signal."""
        if runtime.world == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=runtime.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def train_loop(cfg, runtime, model, tokenizer, data, val_data, optimizer, scheduler, scaler, state, log, console,
               dst_meta) -> int:
    """Run from `state` ({"step", "position": {"epoch", "batch"}}) to cfg.max_steps; return the last step."""
    ddp = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[runtime.device] if runtime.device.type == "cuda"
                                                     else None) if runtime.world > 1 else model)
    params = [p for p in model.parameters() if p.requires_grad]
    step, position = state["step"], state["position"]
    stream = micro_batches(data, position["epoch"], position["batch"], cfg.num_workers)
    preemption = Preemption()
    monitor = TrainingMonitor(model, scaler, runtime)  # skipped steps, non-finite forwards, overflow stop

    def checkpoint():
        if runtime.is_main:
            save_checkpoint(cfg.out, step, model, tokenizer, optimizer, scheduler, scaler, position, dst_meta,
                            keep=cfg.keep_checkpoints)
        if runtime.world > 1:
            torch.distributed.barrier()

    progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s"),
                        TimeRemainingColumn(), console=console, disable=not runtime.is_main)
    task = progress.add_task("train", total=cfg.max_steps, completed=step, loss=float("nan"), tps=0.0)
    try:
        with progress:
            while step < cfg.max_steps:
                started = time.perf_counter()
                window = [next(stream) for _ in range(cfg.accumulation)]
                batches = [b.to(runtime.device) for _, _, b in window]
                data_s = time.perf_counter() - started
                total = global_counts(batches, runtime.device, runtime.world)
                sums = torch.zeros(len(TERMS), dtype=torch.float64)
                for i, batch in enumerate(batches):
                    last = i == len(batches) - 1
                    sync = contextlib.nullcontext() if last or runtime.world == 1 else ddp.no_sync()
                    with sync:
                        with runtime.autocast():
                            out = ddp(batch)
                        terms, here = loss_terms(out, batch, cfg)
                        loss = scaled_loss(terms, here, total, cfg, runtime.world)
                        monitor.check_forward(loss, batch, step, i)
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                    sums += torch.tensor([float(terms[t].detach()) * here[t] for t in TERMS], dtype=torch.float64)
                monitor.stop_if_overflowed()
                if scaler is not None:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                monitor.after_optimizer_step()
                optimizer.zero_grad(set_to_none=True)
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1
                epoch, index, _ = window[-1]
                position = ({"epoch": epoch + 1, "batch": 0} if index + 1 >= data.steps_per_epoch
                            else {"epoch": epoch, "batch": index + 1})
                step_s = time.perf_counter() - started
                tokens = sum(b.num_tokens for b in batches) * runtime.world
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    if runtime.world > 1:
                        sums = sums.to(runtime.device)
                        torch.distributed.all_reduce(sums)
                    values = {t: float(s) / total[t] if total[t] else 0.0 for t, s in zip(TERMS, sums.tolist())}
                    weights = loss_weights(cfg)
                    loss_value = sum(getattr(weights, w) * values[t] for t, w in zip(TERMS, LOSS_WEIGHT_NAMES))
                    log({"step": step, "loss": loss_value, **values, "lr": lr, "tokens_per_s": tokens / step_s,
                         "epoch": epoch, "data_s": data_s, "step_s": step_s, **monitor.metrics()})
                    progress.update(task, loss=loss_value, tps=tokens / step_s)
                progress.update(task, completed=step)
                if val_data is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                    log({"step": step, **validate(model, val_data, cfg, runtime)})
                if preemption.requested_anywhere(runtime):
                    console.print(f"SIGTERM: saving a checkpoint at step {step} and stopping")
                    checkpoint()
                    return step
                if step % cfg.save_every == 0 or step == cfg.max_steps:
                    checkpoint()
    finally:
        preemption.restore()
    return step


def jsonl_logger(path, enabled: bool, extra_sinks=()):
    """Append metric lines to metrics.jsonl (main rank only), and to optional TensorBoard / W&B sinks."""
    def log(values: dict) -> None:
        if not enabled:
            return
        with open(path, "a") as f:
            f.write(json.dumps(values) + "\n")
        for sink in extra_sinks:
            sink(values)
    return log
