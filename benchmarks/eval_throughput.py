"""Conversations per second of `dst eval` (model mode) for several `--batch-dialogues`, side by side in one run.

    python benchmarks/eval_throughput.py [--model mid|tiny-random|256M|500M|2.2B] [--batches 1,4,8,16]
        [--conversations 32] [--frames 150] [--repeats 2] [--threads N] [--json]

Writes synthetic shards (one conversation per video, `--frames` frames, random float16 embeddings, labels of
synthetic dialogues through the real label rules), builds a randomly initialised model, and streams every
conversation in model mode (full video) with `Streamer.run_many` for each batch size, the batch sizes alternating
`--repeats` times. The thresholds are set so that the random heads update the DST at about 3% and speak at about
5% of the frames (quantiles of their probabilities on the first conversation); responses run to `--max-new-tokens`
(a random model rarely says EOS). Reports conversations/s, the speed-up over B = 1, frames/s, the share of the
time inside the model's forwards, the tokens per forward, and whether every batch size made the same decisions
and texts as B = 1. `mid` is a randomly initialised text model (hidden 512, 8 layers); on a GPU use the real
shapes (fp16).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from train_step import (  # same folder: run as `python benchmarks/eval_throughput.py`
    build,
    synthetic_shards,
)

from eval.stream import StreamConfig, Streamer
from pipeline.shard_index import ShardIndex
from train.sequence import SequenceFormat


def jobs(index: ShardIndex):
    for vid in index.video_ids:
        meta = index.meta(vid)
        yield vid, meta, index.rows(vid, 0, index.num_rows(vid)), 0, None


def calibrate(
    model, fmt, cfg: StreamConfig, index: ShardIndex, device, update_rate: float, speak_rate: float, rounds: int = 6
) -> tuple[float, float]:
    """Thresholds that give about these rates on the first conversation: start at the (1 - rate) quantiles of the
    heads' probabilities without generation, then bisect in model mode (generated text changes what follows)."""
    _, meta, emb, c, _ = next(jobs(index))

    def rates(theta_update: float, theta_speak: float) -> tuple[list[dict], float, float]:
        streamer = Streamer(model, fmt, replace(cfg, theta_update=theta_update, theta_speak=theta_speak), device)
        frames = streamer.run(meta, emb, c)["frames"]
        return (
            frames,
            sum(bool(f["pred_dst_delta"]) for f in frames) / len(frames),
            sum(bool(f["pred_text"]) for f in frames) / len(frames),
        )

    frames, _, _ = rates(1.0, 1.0)
    theta = [
        float(np.quantile([f["p_update"] for f in frames], 1 - update_rate)),
        float(np.quantile([f["p_speak"] for f in frames], 1 - speak_rate)),
    ]
    brackets = [[0.0, 1.0], [0.0, 1.0]]
    for _ in range(rounds):
        _, *got = rates(*theta)
        for i, (rate, target) in enumerate(zip(got, (update_rate, speak_rate))):
            brackets[i][0 if rate > target else 1] = theta[i]  # too many: raise the threshold
            theta[i] = sum(brackets[i]) / 2
    return theta[0], theta[1]


def timed_run(model, fmt, cfg: StreamConfig, index: ShardIndex, device, slots: int) -> dict:
    streamer = Streamer(model, fmt, cfg, device, slots)
    engine, clock = streamer.engine, {"forward": 0.0, "forwards": 0, "tokens": 0}
    forward = engine.forward

    def timed_forward(requests):
        start = time.perf_counter()
        out = forward(requests)
        if device.type == "cuda":
            torch.cuda.synchronize()
        clock["forward"] += time.perf_counter() - start
        clock["forwards"] += 1
        clock["tokens"] += sum(len(r.ids) for r in requests)
        return out

    engine.forward = timed_forward
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start, start_cpu = time.perf_counter(), time.thread_time()
    results = dict(streamer.run_many(jobs(index)))
    seconds, cpu_seconds = time.perf_counter() - start, time.thread_time() - start_cpu
    frames = [f for vid in sorted(results) for f in results[vid]["frames"]]
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "conversations": len(results),
        "frames": len(frames),
        "forward_share": clock["forward"] / seconds,
        "tokens_per_forward": clock["tokens"] / clock["forwards"],
        "decisions": [(bool(f["pred_dst_delta"]), f["pred_dst_text"], f["pred_text"]) for f in frames],
        "spoken": sum(bool(f["pred_text"]) for f in frames),
        "updates": sum(bool(f["pred_dst_delta"]) for f in frames),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mid")
    parser.add_argument("--hidden", type=int, default=512, help="width of the mid model")
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-context", type=int, default=4096)
    parser.add_argument("--update-rate", type=float, default=0.03)
    parser.add_argument("--speak-rate", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="end with one line `RESULT {json}`")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = build(args.model, lora=False, hidden=args.hidden)
    model = model.to(device, torch.float16 if device.type == "cuda" else torch.float32).eval()
    hidden = model.lm_head.in_features
    with tempfile.TemporaryDirectory() as tmp:
        index = ShardIndex.build(synthetic_shards(Path(tmp), args.conversations, args.frames, hidden))
        fmt = SequenceFormat(tokenizer, index.tokens_per_frame)
        cfg = StreamConfig(max_new_tokens=args.max_new_tokens, max_context=args.max_context, protocol="full-video")
        theta_update, theta_speak = calibrate(model, fmt, cfg, index, device, args.update_rate, args.speak_rate)
        cfg = replace(cfg, theta_update=theta_update, theta_speak=theta_speak)
        name = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        )
        print(
            f"device {name}; model {args.model}; {args.conversations} conversations x {args.frames} frames; "
            f"thresholds update {theta_update:.3f}, speak {theta_speak:.3f}",
            flush=True,
        )
        runs: dict[int, list[dict]] = {b: [] for b in batches}
        for repeat in range(args.repeats):
            for b in batches:
                run = timed_run(model, fmt, cfg, index, device, b)
                runs[b].append(run)
                print(
                    f"  repeat {repeat + 1} B={b:<3} {run['conversations'] / run['seconds']:.3f} conversations/s "
                    f"({run['seconds']:.1f} s)",
                    flush=True,
                )
    base = runs[batches[0]]
    # this thread's CPU time misses other threads' work and the GPU's: only reported for one CPU thread
    clocks = ["seconds", "cpu_seconds"] if device.type == "cpu" and torch.get_num_threads() == 1 else ["seconds"]
    rows = []
    for b in batches:
        first = runs[b][0]
        same = sum(a == o for a, o in zip(first["decisions"], base[0]["decisions"]))
        row = {
            "batch": b,
            "frames_per_s": statistics.median(r["frames"] / r["seconds"] for r in runs[b]),
            "forward_share": first["forward_share"],
            "tokens_per_forward": first["tokens_per_forward"],
            "same_as_first": f"{same}/{len(first['decisions'])}",
            "peak_gib": first["peak_gib"],
        }
        line = f"B={b:<3}"
        for clock in clocks:
            rates = [r["conversations"] / r[clock] for r in runs[b]]
            speedups = [o[clock] / r[clock] for r, o in zip(runs[b], base)]  # same conversations: time ratio
            suffix = "" if clock == "seconds" else "_cpu"
            row |= {
                f"conversations_per_s{suffix}": statistics.median(rates),
                f"range{suffix}": [min(rates), max(rates)],
                f"speedup{suffix}": statistics.median(speedups),
                f"speedup_range{suffix}": [min(speedups), max(speedups)],
            }
            line += (
                f" {'wall' if clock == 'seconds' else 'cpu'}: {statistics.median(rates):.3f} conversations/s "
                f"(range {min(rates):.3f}-{max(rates):.3f}), x{statistics.median(speedups):.2f} (range "
                f"{min(speedups):.2f}-{max(speedups):.2f});"
            )
        rows.append(row)
        print(
            line + f" {row['frames_per_s']:.1f} frames/s, {100 * first['forward_share']:.0f}% in forwards, "
            f"{first['tokens_per_forward']:.1f} tokens per forward, frames equal to B={batches[0]}: "
            f"{row['same_as_first']}" + (f", peak {first['peak_gib']:.2f} GiB" if first["peak_gib"] else "")
        )
    print(f"spoken frames {base[0]['spoken']}, DST updates {base[0]['updates']} of {base[0]['frames']}")
    if args.json:
        print("RESULT " + json.dumps({"device": name, "model": args.model, "rows": rows}))


if __name__ == "__main__":
    main()
