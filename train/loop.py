"""The training loop: accumulation, mixed precision, DDP, logging, validation, checkpoints, SIGTERM."""

from __future__ import annotations

import contextlib
import json
import math
import time

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from train.checkpoint import agree_saved, checkpoint_folder, save_checkpoint
from train.fp16_monitor import TrainingMonitor
from train.guards import NonFiniteGuard, check_weights
from train.losses import LOSS_WEIGHT_NAMES, TERMS
from train.preemption import (
    Preemption,
    ignore_sigterm_in_worker,
    sigterm_blocked,
    write_marker,
)
from train.step import global_counts, loss_terms, loss_weights, scaled_loss, validate


def micro_batches(data, epoch: int, start: int, workers: int, device: torch.device):
    """(epoch, index in epoch, Batch) forever, from a data position; each epoch is a fresh deterministic draw.
    Workers ignore SIGTERM (see train/preemption.py). For a GPU the batches come in pinned memory, so that
    `Batch.to(non_blocking=True)` copies them asynchronously (from pageable memory a copy is synchronous)."""
    while True:
        batches = data.batches_for_epoch(epoch, start=start)
        loader = torch.utils.data.DataLoader(
            batches,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            worker_init_fn=ignore_sigterm_in_worker if workers else None,
            pin_memory=device.type == "cuda",
        )
        with sigterm_blocked():
            iterator = iter(loader)  # starts the workers
        for i, batch in enumerate(iterator, start):
            yield epoch, i, batch
        epoch, start = epoch + 1, 0


def train_loop(
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
    dst_meta,
    preemption: Preemption | None = None,
) -> int:
    """Run from `state` ({"step", "position": {"epoch", "batch"}}) to cfg.max_steps; return the last step."""
    ddp = (
        torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device] if runtime.device.type == "cuda" else None
        )
        if runtime.world > 1
        else model
    )
    params = [p for p in model.parameters() if p.requires_grad]
    step, position = state["step"], state["position"]
    stream = micro_batches(data, position["epoch"], position["batch"], cfg.num_workers, runtime.device)
    own_preemption = preemption is None
    preemption = preemption or Preemption()
    guard = NonFiniteGuard(data.index)  # non-finite inputs, losses, gradients, weights: stop naming the sample
    # skipped steps, non-finite forwards (counted over the whole run, resumed from the checkpoint), overflow stop
    monitor = TrainingMonitor(model, scaler, runtime, state.get("monitor"))
    saved = [None]  # the newest checkpoint folder written by this process

    def checkpoint():
        # Every rank checks (the weights are the same on all): all raise together, none waits in the barrier.
        check_weights(
            ((n, p) for n, p in model.named_parameters() if p.requires_grad),
            step,
            str(cfg.out / "checkpoints" / "last"),
        )
        failure = None
        if runtime.is_main:
            try:
                saved[0] = save_checkpoint(
                    cfg.out,
                    step,
                    model,
                    tokenizer,
                    optimizer,
                    scheduler,
                    scaler,
                    position,
                    dst_meta,
                    keep=cfg.keep_checkpoints,
                    counters=monitor.counters(),
                )
            except Exception as exc:  # raised by agree_saved, on every rank: none may wait for the others
                failure = exc
        agree_saved(runtime, checkpoint_folder(cfg.out, step), failure)

    def stop_for_signal(reason: str) -> int:
        console.print(f"SIGTERM: {reason}; --resume continues", highlight=False)
        if runtime.is_main:
            write_marker(cfg.out, step, saved[0])
        return step

    progress = Progress(
        TextColumn("step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(),
        console=console,
        disable=not runtime.is_main,
    )
    task = progress.add_task("train", total=cfg.max_steps, completed=step, loss=float("nan"), tps=0.0)
    try:
        with progress:
            if step < cfg.max_steps and preemption.requested_anywhere(runtime):  # signalled during set-up
                return stop_for_signal(f"stopped before step {step + 1}, nothing new to save")
            while step < cfg.max_steps:
                started = time.perf_counter()
                window = [next(stream) for _ in range(cfg.accumulation)]
                batches = [b.to(runtime.device, non_blocking=True) for _, _, b in window]
                data_s = time.perf_counter() - started
                total = global_counts(batches, runtime.device, runtime.world)
                sums = torch.zeros(len(TERMS), dtype=torch.float64)
                for i, batch in enumerate(batches):

                    def windows(e=window[i][0], j=window[i][1]):  # named only if the guard stops
                        return data.rank_batches(e)[j]

                    guard.inputs(batch, windows, f"step {step + 1}")
                    last = i == len(batches) - 1
                    sync = contextlib.nullcontext() if last or runtime.world == 1 else ddp.no_sync()
                    with sync:
                        with runtime.autocast():
                            out = ddp(batch)
                        terms, here = loss_terms(out, batch, cfg)
                        loss = scaled_loss(terms, here, total, cfg, runtime.world)
                        if guard.problem is None:  # non-finite inputs are the guard's to report, not an overflow
                            monitor.check_forward(loss, batch, step, i)
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                    values = {t: float(terms[t].detach()) for t in TERMS}
                    guard.loss(values, windows, step + 1)
                    sums += torch.tensor([values[t] * here[t] for t in TERMS], dtype=torch.float64)
                monitor.stop_if_overflowed()  # names the layer whose activations overflowed
                guard.stop_if_any(runtime)  # names the shard and sample
                if scaler is not None:
                    scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                guard.gradients(
                    norm,
                    scaler,
                    lambda window=window: [w for e, j, _ in window for w in data.rank_batches(e)[j]],
                    step + 1,
                )
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                skipped = monitor.after_optimizer_step()
                optimizer.zero_grad(set_to_none=True)
                lr = scheduler.get_last_lr()[0]
                if not skipped:  # GradScaler skipped the update (inf/NaN gradients): the schedule waits for it
                    scheduler.step()
                step += 1
                epoch, index, _ = window[-1]
                position = (
                    {"epoch": epoch + 1, "batch": 0}
                    if index + 1 >= data.steps_per_epoch
                    else {"epoch": epoch, "batch": index + 1}
                )
                step_s = time.perf_counter() - started
                tokens = sum(b.num_tokens for b in batches) * runtime.world
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    if runtime.world > 1:
                        sums = sums.to(runtime.device)
                        torch.distributed.all_reduce(sums)
                    values = {
                        t: float(s) / total[t] if total[t] else 0.0 for t, s in zip(TERMS, sums.tolist(), strict=True)
                    }
                    weights = loss_weights(cfg)
                    loss_value = sum(
                        getattr(weights, w) * values[t] for t, w in zip(TERMS, LOSS_WEIGHT_NAMES, strict=True)
                    )
                    log(
                        {
                            "step": step,
                            "loss": loss_value,
                            **values,
                            "lr": lr,
                            "tokens_per_s": tokens / step_s,
                            "epoch": epoch,
                            "data_s": data_s,
                            "step_s": step_s,
                            **monitor.metrics(),
                        }
                    )
                    progress.update(task, loss=loss_value, tps=tokens / step_s)
                progress.update(task, completed=step)
                if val_data is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                    metrics = validate(model, guard.checked(val_data, f"validation at step {step}"), cfg, runtime)
                    guard.stop_if_any(runtime)
                    log({"step": step, **metrics})
                if step < cfg.max_steps and preemption.requested_anywhere(runtime):  # at the end: just finish
                    console.print(f"SIGTERM: saving a checkpoint at step {step} and stopping", highlight=False)
                    checkpoint()
                    return stop_for_signal(f"saved {saved[0] or 'a checkpoint'} at step {step}")
                if step % cfg.save_every == 0 or step == cfg.max_steps:
                    checkpoint()
    finally:
        stream.close()  # shuts the DataLoader workers down now, not whenever the generator is collected
        if own_preemption:
            preemption.restore()
    return step


def _json_value(value):
    """NaN and infinities are not JSON: written as null (strict JSON readers would reject the whole file)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def jsonl_logger(path, enabled: bool, extra_sinks=()):
    """Append metric lines to metrics.jsonl (main rank only), and to optional TensorBoard / W&B sinks."""

    def log(values: dict) -> None:
        if not enabled:
            return
        with open(path, "a") as f:
            f.write(json.dumps({k: _json_value(v) for k, v in values.items()}, allow_nan=False) + "\n")
        for sink in extra_sinks:
            sink(values)

    return log
