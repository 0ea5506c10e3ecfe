"""Frames per second of `dst prepare`'s stages, and of its frame feeder with 0, 1, 2 ... decoding workers.

    python benchmarks/prepare_throughput.py [--frames 256] [--feed-frames 512] [--workers 0,1,2] [--gpu-ms 10]
                                            [--real-frames 8] [--device auto] [--skip-stages] [--skip-workers]
                                            [--shapes 256M,500M] [--json]

All rows run the calls `dst prepare` makes (FrameFeeder -> encode_frames, batches of 32) over one synthetic frames
file of 384x384 JPEGs (ProAssist's size).

1. Stages, in-process (workers 0): decode alone; decode + preprocess to the tiny model's 64 px and to SmolVLM2's
   512 px; decode + preprocess + encode with the tiny model; and with randomly initialised models of the real 256M
   (and, on a GPU, 500M and 2.2B) shapes (no download). On a GPU it also prints the hours to prepare ProAssist's
   ~3.4M frames at the measured rate. `--shapes` picks the model shapes (`tiny-random` for a quick check).
2. Workers, side by side: for each worker count, "decode + preprocess 512 px" alone; followed by a tiny encoder that
   takes 512 px input (64 px patches; its patch convolution still reads every 512 px pixel); and followed by a
   stand-in for a GPU encoder that waits `--gpu-ms` per frame without using the CPU (what overlapping decoding with
   encoding is for). The worker counts are measured in turn, round after round (best of 3), so that a change in
   machine load hits them alike; worker start-up is not counted (each feeder is started and warmed first). Under
   each rate: the CPU time per frame of the main process and of the workers (Linux), averaged over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from pipeline.embeddings import encode_frames
from pipeline.frame_feeder import FrameFeeder
from pipeline.frame_sources import open_frames
from pipeline.frames_files import synthetic_jpegs, write_frames_file
from pipeline.models import load_model
from pipeline.smolvlm import build_random, build_tiny_tokenizer, tiny_config, vision_spec

PROASSIST_FRAMES = 3.4e6


def _batches(n: int, batch: int) -> list[range]:
    return [range(i, min(i + batch, n)) for i in range(0, n, batch)]


def decode_rate(path: Path, n: int, batch: int) -> float:
    start = time.perf_counter()
    with open_frames(path) as src:
        for indices in _batches(n, batch):
            src.decode(indices)
    return n / (time.perf_counter() - start)


def rate(
    feeder: FrameFeeder | None, path: Path, n: int, batch: int, image_size: int, model=None, device=None, encode=None
) -> float:
    """Frames per second through the feeder (a fresh in-process one when None), encoding with `model` if given,
    or calling `encode(pixels)`."""
    if feeder is None:
        with FrameFeeder(0, image_size, batch, 2.0) as local:
            return rate(local, path, n, batch, image_size, model, device, encode)
    start = time.perf_counter()
    with feeder.feed(path, _batches(n, batch)) as fed:
        for fed_batch in fed:
            if model is not None:
                encode_frames(model, fed_batch.pixels, 5, batch, device)
            elif encode is not None:
                encode(fed_batch.pixels)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def tiny_512_encoder():
    """The tiny model's vision tower on 512 px input: 64 px patches keep its 8x8 patch grid, so it stays cheap."""
    from transformers import SmolVLMForConditionalGeneration

    config = tiny_config(build_tiny_tokenizer())
    config.vision_config.image_size, config.vision_config.patch_size = 512, 64
    torch.manual_seed(0)
    return SmolVLMForConditionalGeneration(config).eval()


def stage_rows(path: Path, args, device: torch.device) -> list[dict]:
    tiny, _ = load_model("tiny-random", device=device)
    rate(None, path, 32, args.batch_size, 64, tiny, device)  # warm-up: first arrow take, PIL plugins, the model
    fps = max(decode_rate(path, args.frames, args.batch_size) for _ in range(3))
    print(f"{'decode only':<40} {fps:8.1f} frames/s (best of 3 x {args.frames} frames)")
    rows = [{"stage": "decode only", "frames_per_s": fps}]
    cheap = {
        "decode + preprocess 64 px": (64, None),
        "decode + preprocess 512 px": (512, None),
        "decode + preprocess 64 px + tiny model": (64, tiny),
    }
    for label, (size, model) in cheap.items():
        fps = max(rate(None, path, args.frames, args.batch_size, size, model, device) for _ in range(3))
        print(f"{label:<40} {fps:8.1f} frames/s (best of 3 x {args.frames} frames)")
        rows.append({"stage": label, "frames_per_s": fps})
    shapes = args.shapes.split(",") if args.shapes else ("256M", "500M", "2.2B") if device.type == "cuda" else ("256M",)
    n_real = args.frames if device.type == "cuda" else args.real_frames
    for shape in shapes:
        model = load_model(shape, device=device)[0] if shape == "tiny-random" else build_random(shape)
        model = model.to(device, torch.float16 if device.type == "cuda" else torch.float32).eval()
        spec = vision_spec(model)
        rate(None, path, min(n_real, args.batch_size), args.batch_size, spec.image_size, model, device)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        fps = rate(None, path, n_real, args.batch_size, spec.image_size, model, device)
        line = f"{f'decode + preprocess + {shape} shape':<40} {fps:8.1f} frames/s ({n_real} frames)"
        row = {
            "stage": f"decode + preprocess + {shape} shape",
            "shape": shape,
            "frames_per_s": fps,
            "frames": n_real,
            "hours_for_3.4M_frames": PROASSIST_FRAMES / fps / 3600,
        }
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            line += f", peak {row['peak_gib']:.1f} GiB, {PROASSIST_FRAMES / fps / 3600:.1f} h for 3.4M frames"
        print(line)
        rows.append(row)
        del model
    return rows


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_rows(path: Path, args, device: torch.device) -> None:
    encoder = tiny_512_encoder().to(device)

    def waiting_encoder(pixels: torch.Tensor) -> None:  # busy elsewhere, like a GPU: the CPU stays free
        time.sleep(len(pixels) * args.gpu_ms / 1000)

    counts = [int(w) for w in args.workers.split(",")]
    feeders = {w: FrameFeeder(w, 512, args.batch_size, 2.0) for w in counts}
    paths = {
        "decode + preprocess 512 px": {},
        "decode + preprocess 512 px + tiny encoder": {"model": encoder, "device": device},
        f"decode + preprocess 512 px + {args.gpu_ms:g} ms/frame wait": {"encode": waiting_encoder},
    }
    best = {(w, label): 0.0 for w in counts for label in paths}
    cpu = {(w, label): [0.0, 0.0] for w in counts for label in paths}  # main, workers: seconds over all rounds
    try:
        for feeder in feeders.values():  # start the workers and warm them up, outside the timing
            rate(feeder, path, 2 * args.batch_size * max(1, feeder.workers), args.batch_size, 512, encoder, device)
        for _ in range(3):
            for label, how in paths.items():
                for w, feeder in feeders.items():
                    main_before = time.process_time()
                    workers_before = sum(map(_cpu_seconds, feeder.worker_pids))
                    fps = rate(feeder, path, args.feed_frames, args.batch_size, 512, **how)
                    cpu[w, label][0] += time.process_time() - main_before
                    cpu[w, label][1] += sum(map(_cpu_seconds, feeder.worker_pids)) - workers_before
                    best[w, label] = max(best[w, label], fps)
    finally:
        for feeder in feeders.values():
            feeder.close()
    print(f"\nframe feeder, best of 3 rounds x {args.feed_frames} frames, batches of {args.batch_size}:")
    print(f"{'path':<48}" + "".join(f"{f'{w} workers':>12}" for w in counts))
    for label in paths:
        base = best[counts[0], label]
        print(f"{label:<48}" + "".join(f"{best[w, label]:12.1f}" for w in counts) + "  frames/s")
        print(
            f"{'  ratio to ' + str(counts[0]) + ' workers':<48}"
            + "".join(f"{best[w, label] / base:12.2f}" for w in counts)
        )
        per_frame = {w: [1000 * t / (3 * args.feed_frames) for t in cpu[w, label]] for w in counts}
        print(
            f"{'  CPU ms/frame, main + workers':<48}"
            + "".join(f"{f'{m:.1f} + {k:.1f}':>12}" for m, k in per_frame.values())
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=256, help="frames per stage measurement")
    parser.add_argument("--feed-frames", type=int, default=512, help="frames per worker measurement")
    parser.add_argument("--workers", default="0,1,2", help="worker counts to compare, comma-separated")
    parser.add_argument("--real-frames", type=int, default=8, help="frames for the real-shape models on CPU")
    parser.add_argument(
        "--gpu-ms",
        type=float,
        default=10.0,
        help="the waiting encoder's time per frame (stands in for a GPU: the CPU stays free)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-stages", action="store_true", help="only the worker comparison")
    parser.add_argument("--skip-workers", action="store_true", help="only the stages")
    parser.add_argument(
        "--shapes",
        default=None,
        help="comma-separated: 256M,500M,2.2B,tiny-random (default: all three real shapes on a GPU, 256M on a CPU)",
    )
    parser.add_argument("--json", action="store_true", help="end with one line `RESULT {json}` (the stage rows)")
    args = parser.parse_args()
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frames.arrow"
        write_frames_file(path, synthetic_jpegs(max(args.frames, args.feed_frames), size=384))
        rows = [] if args.skip_stages else stage_rows(path, args, device)
        if not args.skip_workers:
            worker_rows(path, args, device)
    if args.json:
        print("RESULT " + json.dumps({"device": name, "rows": rows}))


if __name__ == "__main__":
    main()
