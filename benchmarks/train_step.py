"""Where a `dst train` step's time goes, and how much of each batch is padding.

    python benchmarks/train_step.py [--model mid|tiny-random|smollm2-135m|256M|500M|2.2B] [--steps 30] [--full]
        [--tokens 4096|auto] [--memory-fraction 0.9] [--max-seq-len 1024] [--threads N] [--json]

Writes synthetic shards (random float16 frame embeddings of the model's width, labels of synthetic dialogues through
the real label rules), then runs the loop's pieces by hand: fetching a batch from the DataLoader, moving it, forward
+ backward, the optimizer step; reports the share of step time outside forward + backward, the padding share of the
packed batches, tokens/s and (on a GPU) peak memory. `mid` is a randomly initialised text model of moderate size
(hidden 512, 8 layers) so CPU timings are not dominated by the tiny model's near-zero compute; `smollm2-135m` is the
real SmolLM2-135M language half (pipeline/smollm2.py); 256M/500M/2.2B are randomly initialised real shapes (no
download). `--tokens auto` runs `dst train --batch-size auto`'s search (fp16 on a GPU, under `--memory-fraction` of
its memory) and times steps at the budget it picks (more synthetic videos are written when the picked budget needs
them); `--json` ends with one line `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.models import load_model
from pipeline.records import parse_record
from pipeline.shard_index import ShardIndex
from pipeline.shards import VideoMeta, encode_sample, sample_key, write_shard
from pipeline.smolvlm import SMOLLM2, build_random, build_tiny_random, tiny_config
from pipeline.timeline import video_labels
from train.budget import resolve_token_budget
from train.build import Runtime, build_optimizer
from train.config import resolve
from train.loader import TrainData
from train.model import DSTModel, freeze_vision, wrap_lora
from train.sequence import SequenceFormat
from train.step import global_counts, loss_terms, scaled_loss
from train.windows import padding_share


def build(name: str, lora: bool, hidden: int):
    if name == SMOLLM2:  # the real SmolLM2-135M weights and tokenizer (pipeline/smollm2.py)
        vlm, tokenizer = load_model(SMOLLM2)
        freeze_vision(vlm)
        return DSTModel(wrap_lora(vlm) if lora else vlm), tokenizer
    vlm, tokenizer = build_tiny_random()
    if name == "mid":
        from transformers import SmolVLMForConditionalGeneration

        config = tiny_config(tokenizer)
        config.text_config.update(
            dict(
                hidden_size=hidden,
                intermediate_size=4 * hidden,
                num_hidden_layers=8,
                num_attention_heads=8,
                num_key_value_heads=4,
                head_dim=hidden // 8,
            )
        )
        torch.manual_seed(0)
        vlm = SmolVLMForConditionalGeneration(config)
    elif name != "tiny-random":
        vlm = build_random(name)
    freeze_vision(vlm)
    return DSTModel(wrap_lora(vlm) if lora else vlm), tokenizer


def synthetic_shards(folder: Path, videos: int, frames: int, hidden: int, tokens: int = 5) -> Path:
    """`videos` videos of `frames` frames, 6 steps each, a few dozen dialogue turns, in one shard."""
    rng = random.Random(0)
    samples = []
    for v in range(videos):
        length = frames / 2
        bounds = sorted(rng.uniform(0, length) for _ in range(12))
        turns = sorted(rng.uniform(0, length) for _ in range(rng.randint(10, 40)))
        raw = {
            "video_uid": f"v{v}",
            "parsed_video_anns": {"dataset": "wtag", "video_start_time": 0.0},
            "inferred_goal": "make the thing",
            "dst": [
                {
                    "id": f"S{i + 1}",
                    "name": f"step {i + 1} of the task",
                    "start_ts": bounds[2 * i],
                    "end_ts": bounds[2 * i + 1],
                }
                for i in range(6)
            ],
            "conversations": [
                {
                    "user_type": "talk_some",
                    "conversation": [
                        {
                            "role": rng.choice(["user", "assistant", "assistant"]),
                            "time": t,
                            "content": "now attach the wheel to the chassis and tighten the screw",
                        }
                        for t in turns
                    ],
                }
            ],
        }
        labels = video_labels(parse_record(raw), frames, 2.0)
        emb = np.random.default_rng(v).standard_normal((frames, tokens, hidden)).astype(np.float16)
        samples.append(
            encode_sample(sample_key("wtag", f"v{v}"), emb, VideoMeta.from_labels(labels, "synthetic", tokens))
        )
    write_shard(folder / "shard-000000.tar", samples)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--hidden", type=int, default=512, help="width of the mid model")
    parser.add_argument("--model", default="mid")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tokens", default="4096", help="token budget per micro-batch, or auto")
    parser.add_argument("--memory-fraction", type=float, default=0.9, help="for --tokens auto")
    parser.add_argument("--json", action="store_true", help="end with one line `RESULT {json}`")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = build(args.model, not args.full, args.hidden)
    hidden = model.lm_head.in_features
    model = model.to(device).train()
    options = {
        "model": args.model,
        "out": Path("unused"),
        "max_steps": args.steps,
        "max_seq_len": args.max_seq_len,
        "batch_size": args.tokens,
        "memory_fraction": args.memory_fraction,
    }
    fmt = SequenceFormat(tokenizer, 5)
    picked = None
    if args.tokens == "auto":  # the search `dst train` runs, its probe shaped by shards like the timed ones
        runtime = Runtime(0, 1, 0, device, "fp16" if device.type == "cuda" else "fp32")
        probe = ShardIndex.build(synthetic_shards(Path(tempfile.mkdtemp()), args.videos, args.frames, hidden))
        picked = resolve_token_budget(resolve({**options, "shards": Path("unused")}), runtime, model, fmt, probe)
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    tokens_per_step = picked or int(args.tokens)
    # enough videos for the warm-up and timed steps at this budget (a video's frames give ~10 tokens each)
    videos = max(args.videos, math.ceil(1.3 * tokens_per_step * (args.steps + 3) / (10 * args.frames)))
    shards = synthetic_shards(Path(tempfile.mkdtemp()), videos, args.frames, hidden)
    index = ShardIndex.build(shards)
    cfg = resolve({**options, "shards": shards, "batch_size": str(tokens_per_step)})
    data = TrainData.from_config(index, fmt, cfg, tokens_per_step)
    optimizer, scheduler = build_optimizer(cfg, model)
    autocast = (
        torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    loader = iter(torch.utils.data.DataLoader(data.batches_for_epoch(0), batch_size=None, num_workers=args.workers))
    times = {"total": 0.0, "fwd_bwd": 0.0}
    tokens = 0
    steps = min(args.steps, data.steps_per_epoch - 3)
    if steps < 1:
        raise SystemExit(f"{data.steps_per_epoch} batches in an epoch: too few for 3 warm-up steps and one timed")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the steps' peak, not the search's
    for step in range(steps + 3):  # 3 warm-up steps are not counted
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        batch = next(loader).to(device)
        total = global_counts([batch], device, 1)
        sync()
        compute = time.perf_counter()
        with autocast:
            out = model(batch)
        terms, here = loss_terms(out, batch, cfg)
        loss = scaled_loss(terms, here, total, cfg, 1)
        (scaler.scale(loss) if scaler else loss).backward()
        sync()
        fwd_bwd = time.perf_counter() - compute
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        sync()
        if step >= 3:
            times["total"] += time.perf_counter() - start
            times["fwd_bwd"] += fwd_bwd
            tokens += batch.num_tokens
    outside = 1 - times["fwd_bwd"] / times["total"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"device {name}; model {args.model} ({'full' if args.full else 'LoRA'}); {steps} steps of "
        f"{tokens_per_step} tokens, max_seq_len {args.max_seq_len}, {args.workers} workers"
    )
    print(f"step time outside forward+backward: {100 * outside:.1f}% (data, transfer, optimizer)")
    print(f"padding share of the epoch's batches: {100 * padding_share(data.rank_batches(0)):.1f}%")
    print(f"tokens/s (non-pad): {tokens / times['total']:,.0f}")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if picked is not None:
        print(f"--batch-size auto (memory fraction {args.memory_fraction}) picked {picked} tokens per micro-batch")
    if peak is not None:
        print(f"peak memory: {peak:.2f} GiB")
    if args.json:
        print(
            "RESULT "
            + json.dumps(
                {
                    "device": name,
                    "model": args.model,
                    "mode": "full" if args.full else "LoRA",
                    "steps": steps,
                    "precision": "fp16" if device.type == "cuda" else "fp32",
                    "token_budget": tokens_per_step,
                    "auto_pick": picked,
                    "memory_fraction": args.memory_fraction,
                    "max_seq_len": args.max_seq_len,
                    "tokens_per_s": tokens / times["total"],
                    "outside_share": outside,
                    "peak_gib": peak,
                }
            )
        )


if __name__ == "__main__":
    main()
