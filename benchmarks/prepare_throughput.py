"""Frames per second of `dst prepare`'s stages, on this machine's CPU or GPU.

    python benchmarks/prepare_throughput.py [--frames 256] [--real-frames 8] [--device auto] [--shapes 256M,500M]
        [--json]

Measures, over one synthetic frames file of 384x384 JPEGs (ProAssist's size): decode alone; decode + preprocess
to the tiny model's 64 px and to SmolVLM2-256M's 512 px; decode + preprocess + encode with the tiny model; and
with randomly initialised models of the real 256M (and, on a GPU, 500M and 2.2B) shapes (no download). On a GPU
it also prints the hours to prepare ProAssist's ~3.4M frames at the measured rate. `--shapes` picks the model
shapes (`tiny-random` for a quick check); `--json` ends with one line `RESULT {json}` (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from pipeline.embeddings import encode_frames
from pipeline.frame_sources import open_frames
from pipeline.frames_files import synthetic_jpegs, write_frames_file
from pipeline.preprocess import preprocess_frames
from pipeline.smolvlm import build_random, load_model, vision_spec

PROASSIST_FRAMES = 3.4e6


def rate(path: Path, n: int, batch: int, image_size: int | None = None, model=None, device=None,
         repeats: int = 1) -> float:
    """Frames per second through the same calls prepare makes, batch by batch (best of `repeats`)."""
    return max(_rate_once(path, n, batch, image_size, model, device) for _ in range(repeats))


def _rate_once(path, n, batch, image_size, model, device) -> float:
    start = time.perf_counter()
    with open_frames(path) as src:
        for i in range(0, n, batch):
            frames, _ = src.read(range(i, min(i + batch, n)))
            if image_size is not None:
                pixels = preprocess_frames(frames, image_size)
                if model is not None:
                    encode_frames(model, pixels, 5, batch, device)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--real-frames", type=int, default=8, help="frames for the real-shape models on CPU")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--shapes", default=None, help="comma-separated: 256M,500M,2.2B,tiny-random (default: all "
                                                         "three real shapes on a GPU, 256M on a CPU)")
    parser.add_argument("--json", action="store_true", help="end with one line `RESULT {json}`")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}")
    result = {"device": name, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frames.arrow"
        write_frames_file(path, synthetic_jpegs(args.frames, size=384))
        rate(path, min(32, args.frames), args.batch_size)  # warm-up: first arrow take, PIL plugins
        tiny, _ = load_model("tiny-random", device=device)
        rate(path, min(32, args.frames), args.batch_size, 64, tiny, device)
        cheap = {"decode only": (None, None), "decode + preprocess 64 px": (64, None),
                 "decode + preprocess 512 px": (512, None), "decode + preprocess 64 px + tiny model": (64, tiny)}
        for label, (size, model) in cheap.items():
            fps = rate(path, args.frames, args.batch_size, size, model, device, repeats=3)
            print(f"{label:<40} {fps:8.1f} frames/s (best of 3 x {args.frames} frames)")
            result["rows"].append({"stage": label, "frames_per_s": fps})
        shapes = args.shapes.split(",") if args.shapes else ("256M", "500M", "2.2B") if device.type == "cuda" \
            else ("256M",)
        n_real = args.frames if device.type == "cuda" else args.real_frames
        for shape in shapes:
            model = load_model(shape, device=device)[0] if shape == "tiny-random" else build_random(shape)
            model = model.to(device, torch.float16 if device.type == "cuda" else torch.float32).eval()
            spec = vision_spec(model)
            rate(path, min(n_real, args.batch_size), args.batch_size, spec.image_size, model, device)  # warm-up
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            fps = rate(path, n_real, args.batch_size, spec.image_size, model, device)
            line = f"{f'decode + preprocess + {shape} shape':<40} {fps:8.1f} frames/s ({n_real} frames)"
            row = {"stage": f"decode + preprocess + {shape} shape", "shape": shape, "frames_per_s": fps,
                   "frames": n_real, "hours_for_3.4M_frames": PROASSIST_FRAMES / fps / 3600}
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) / 2**30
                line += f", peak {peak:.1f} GiB, {PROASSIST_FRAMES / fps / 3600:.1f} h for 3.4M frames"
                row["peak_gib"] = peak
            print(line)
            result["rows"].append(row)
            del model
    if args.json:
        print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
