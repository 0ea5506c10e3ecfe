"""Per-frame latency of streaming inference, with and without the KV cache, early and late in a video.

    python benchmarks/stream_latency.py [--model mid|tiny-random|smollm2-135m|256M] [--frames 1000]

Feeds the system prompt, then frames (the frame block and both decision reads) through `StreamSession`; a frame's
latency is the time of its feed plus the two head reads. Reported at frame 10 and at the last frame (mean of 5
frames around each), with the cache and with full recomputation. `mid` is a randomly initialised text model
(hidden 512, 8 layers); on a GPU `256M` gives frames/s for the real SmolVLM2-256M shape (random weights).
"""

from __future__ import annotations

import argparse
import time

import torch

from train_step import build  # same folder: run as `python benchmarks/stream_latency.py`
from eval.session import StreamSession
from train.sequence import SequenceFormat


def frame_latencies(session: StreamSession, frames: int, at: list[int], hidden: int, device,
                    max_context: int | None = None) -> dict[int, float]:
    """Mean latency of the 5 frames around each of `at`. With `max_context`, the context is re-seeded with the
    system prompt when it would overflow, as `dst eval` does (its cost counts in the frame that triggers it)."""
    fmt = session.fmt
    nodes = [(f"S{i}", f"step number {i}") for i in range(1, 7)]
    system = fmt.system("assemble the toy", nodes, {n: "not_started" for n, _ in nodes})
    session.reset()
    session.feed(system)
    embeds = torch.randn(fmt.tokens_per_frame, hidden, device=device, dtype=session.dtype)
    timings: dict[int, list[float]] = {k: [] for k in at}
    for k in range(frames):
        watch = [a for a in at if a - 2 <= k <= a + 2]
        if not watch and not session.use_cache:  # only the measured frames need the (quadratic) recomputation
            session.ids += fmt.frame
            session.chunks.append((list(fmt.frame), embeds))
            continue
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if max_context is not None and session.length + len(fmt.frame) > max_context:
            session.refeed([(system, None)])
        hidden_state = session.feed(fmt.frame, embeds)
        session.decisions(hidden_state)
        if device.type == "cuda":
            torch.cuda.synchronize()
        for a in watch:
            timings[a].append(time.perf_counter() - start)
    return {a: sum(t) / len(t) for a, t in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mid")
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--max-context", type=int, default=4096, help="as dst eval's --max-context")
    parser.add_argument("--no-full", action="store_true", help="skip the (slow) run without the cache")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = build(args.model, lora=False, hidden=args.hidden)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = model.to(device, dtype).eval()
    fmt = SequenceFormat(tokenizer, 5)
    hidden = model.lm_head.in_features
    late = args.frames - 3
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {name}; model {args.model}; frame = {len(fmt.frame)} tokens")
    nodes = [(f"S{i}", f"step number {i}") for i in range(1, 7)]
    system = len(fmt.system("assemble the toy", nodes, {n: "not_started" for n, _ in nodes}))
    fullest = (args.max_context - system) // len(fmt.frame) - 3  # the last frames before the re-seed
    bounded = frame_latencies(StreamSession(model, fmt, device), fullest + 3, [10, fullest], hidden, device,
                              args.max_context)
    print(f"with cache, max_context {args.max_context} (re-seeded): frame 10 {1000 * bounded[10]:.2f} ms, "
          f"frame {fullest} (context ~{system + fullest * len(fmt.frame)} tokens, the fullest before a re-seed) "
          f"{1000 * bounded[fullest]:.2f} ms, ratio {bounded[fullest] / bounded[10]:.2f}")
    cached = frame_latencies(StreamSession(model, fmt, device), args.frames, [10, late], hidden, device)
    print(f"with cache, unbounded: frame 10 {1000 * cached[10]:.2f} ms, frame {late} {1000 * cached[late]:.2f} ms, "
          f"ratio {cached[late] / cached[10]:.2f}, {1 / cached[late]:.2f} frames/s at the end")
    if args.no_full:
        return
    full = frame_latencies(StreamSession(model, fmt, device, use_cache=False), args.frames, [10, late], hidden,
                           device)
    print(f"without cache: frame 10 {1000 * full[10]:.2f} ms, frame {late} {1000 * full[late]:.2f} ms, "
          f"ratio {full[late] / full[10]:.2f}")


if __name__ == "__main__":
    main()
