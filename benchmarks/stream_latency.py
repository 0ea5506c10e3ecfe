"""Per-frame latency of streaming inference, early and at the fullest context before a re-seed, side by side with
the DynamicCache path the stream used before the slot cache.

    python benchmarks/stream_latency.py [--model mid|tiny-random|smollm2-135m|256M|500M|2.2B] [--repeats 3]
        [--threads N]
        [--max-context 4096] [--unbounded] [--full] [--json]

Feeds the system prompt, then frames (the frame block and both decision reads) through a `StreamEngine` session
(`slot cache`) and through the previous implementation (`DynamicCache`: one concatenating cache, SDPA with the
key/value heads repeated), re-seeding at `--max-context` as `dst eval` does. A frame's latency is its feed plus
the two head reads, averaged over the 5 frames around frame 10 and around the last frame before the re-seed. The
two paths alternate `--repeats` times in one process; the ratios are reported as median and range, in wall time
and in CPU time of this thread (steadier on a shared machine when --threads 1). `--unbounded` adds 1000 frames
without re-seeding; `--full` adds the recomputation without any cache. `mid` is a randomly initialised text model
(hidden 512, 8 layers); on a GPU, `256M`/`500M`/`2.2B` give frames/s for the real shapes (random weights, fp16).
`--json` ends with one line `RESULT {json}` (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from train_step import (
    build,  # same folder: run as `python benchmarks/stream_latency.py`
)
from transformers import DynamicCache

from eval.engine import StreamEngine
from train.sequence import SequenceFormat

NODES = [(f"S{i}", f"step number {i}") for i in range(1, 7)]


class DynamicCacheStream:
    """The stream's previous forward, kept here as the reference: one DynamicCache, transformers' own attention."""

    def __init__(self, model, fmt, device):
        self.model, self.fmt, self.device = model, fmt, device
        self.reset()

    def reset(self):
        self.cache, self.length = DynamicCache(), 0

    @torch.no_grad()
    def feed(self, ids, embeds=None):
        if embeds is None:
            embeds = torch.zeros(0, self.model.lm_head.in_features, device=self.device)
        input_ids = torch.tensor([ids], device=self.device)
        positions = torch.arange(self.length, self.length + len(ids), device=self.device)[None]
        hidden, self.cache = self.model.hidden_states(
            input_ids, input_ids == self.fmt.image_id, embeds, cache=self.cache, position_ids=positions
        )
        self.length += len(ids)
        return hidden[0, -1]


class EngineStream:
    """The slot cache (what `dst eval` runs), one dialogue; `use_cache=False` recomputes everything."""

    def __init__(self, model, fmt, device, use_cache=True, capacity=4096):
        self.engine = StreamEngine(model, fmt, device, use_cache=use_cache, capacity=capacity)
        self.session = self.engine.sessions[0]

    def reset(self):
        self.session.reset()

    @property
    def length(self):
        return self.session.length

    def feed(self, ids, embeds=None):
        return self.engine.drive(self.session.feed(ids, embeds))


def frame_latencies(
    stream, model, fmt, frames: int, at: list[int], device, max_context: int | None = None
) -> dict[str, dict[int, float]]:
    """Mean latency of the 5 frames around each of `at`, `{"wall": {frame: s}, "cpu": {frame: s}}` (cpu: this
    thread's CPU time). With `max_context`, the context is re-seeded with the system prompt when it would
    overflow, as `dst eval` does (its cost counts in the frame that triggers it)."""
    system = fmt.system("assemble the toy", NODES, {n: "not_started" for n, _ in NODES})
    stream.reset()
    stream.feed(system)
    dtype = model.update_head.weight.dtype
    embeds = torch.randn(fmt.tokens_per_frame, model.lm_head.in_features, device=device, dtype=dtype)
    timings: dict[int, list[tuple[float, float]]] = {k: [] for k in at}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for k in range(frames):
        watch = [a for a in at if a - 2 <= k <= a + 2]
        if not watch and isinstance(stream, EngineStream) and not stream.engine.use_cache:
            # only the measured frames need the (quadratic) recomputation: append without running the model
            stream.session.ids += fmt.frame
            stream.session.chunks.append((list(fmt.frame), embeds))
            continue
        sync()
        start, start_cpu = time.perf_counter(), time.thread_time()
        if max_context is not None and stream.length + len(fmt.frame) > max_context:
            stream.reset()
            stream.feed(system)
        hidden = stream.feed(fmt.frame, embeds)
        with torch.no_grad():
            [torch.sigmoid(x).item() for x in model.decision_logits(hidden)]
        sync()
        wall, cpu = time.perf_counter() - start, time.thread_time() - start_cpu
        for a in watch:
            timings[a].append((wall, cpu))
    return {
        clock: {a: sum(t[i] for t in ts) / len(ts) for a, ts in timings.items()}
        for i, clock in enumerate(("wall", "cpu"))
    }


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} (range {min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mid")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--max-context", type=int, default=4096, help="as dst eval's --max-context")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--unbounded", action="store_true", help="also 1000 frames without re-seeding")
    parser.add_argument("--full", action="store_true", help="also the recomputation without a cache (slow)")
    parser.add_argument("--json", action="store_true", help="end with one line `RESULT {json}`")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = build(args.model, lora=False, hidden=args.hidden)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = model.to(device, dtype).eval()
    fmt = SequenceFormat(tokenizer, 5)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {name}; model {args.model}; frame = {len(fmt.frame)} tokens")
    system = len(fmt.system("assemble the toy", NODES, {n: "not_started" for n, _ in NODES}))
    fullest = (args.max_context - system) // len(fmt.frame) - 3  # the last frames before the re-seed
    context = system + fullest * len(fmt.frame)
    if fullest < 16:
        raise SystemExit(
            f"--max-context {args.max_context} leaves {fullest} frames after the {system}-token system "
            "prompt: too few to compare frame 10 with the fullest"
        )
    streams = {
        "slot cache": EngineStream(model, fmt, device, capacity=args.max_context + 64),
        "DynamicCache": DynamicCacheStream(model, fmt, device),
    }
    # this thread's CPU time misses other threads' work and the GPU's: only reported for one CPU thread
    clocks = ["wall", "cpu"] if device.type == "cpu" and torch.get_num_threads() == 1 else ["wall"]
    results = {(s, c): [] for s in streams for c in clocks}
    for repeat in range(args.repeats):
        for label, stream in streams.items():
            measured = frame_latencies(stream, model, fmt, fullest + 3, [10, fullest], device, args.max_context)
            for clock_name in clocks:
                t = measured[clock_name]
                results[label, clock_name].append(t)
                print(
                    f"  repeat {repeat + 1} {label:<13} {clock_name:<4}: frame 10 {1000 * t[10]:7.2f} ms, "
                    f"frame {fullest} {1000 * t[fullest]:7.2f} ms, ratio {t[fullest] / t[10]:.2f}",
                    flush=True,
                )
    print(
        f"max_context {args.max_context} (re-seeded), frame {fullest} holds ~{context} tokens, the fullest before "
        f"a re-seed; median (range) over {args.repeats} repeats:"
    )
    for (label, clock_name), runs in results.items():
        if runs:
            print(
                f"{label:<13} {clock_name:<4}: frame 10 {spread([1000 * t[10] for t in runs])} ms, frame "
                f"{fullest} {spread([1000 * t[fullest] for t in runs])} ms, ratio "
                f"{spread([t[fullest] / t[10] for t in runs])}, {1 / statistics.median(t[fullest] for t in runs):.0f}"
                " frames/s at the fullest"
            )
    for clock_name in clocks:
        new, old = results["slot cache", clock_name], results["DynamicCache", clock_name]
        if new:
            early = [a[10] / b[10] for a, b in zip(new, old)]
            late = [a[fullest] / b[fullest] for a, b in zip(new, old)]
            print(f"slot cache / DynamicCache ({clock_name}): frame 10 {spread(early)}, frame {fullest} {spread(late)}")
    if args.json:
        print(
            "RESULT "
            + json.dumps(
                {
                    "device": name,
                    "model": args.model,
                    "max_context": args.max_context,
                    "fullest_frame": fullest,
                    "context_tokens": context,
                    "rows": [
                        {
                            "path": label,
                            "clock": clock_name,
                            "frame_10_ms": 1000 * statistics.median(t[10] for t in runs),
                            "fullest_ms": 1000 * statistics.median(t[fullest] for t in runs),
                            "ratio": statistics.median(t[fullest] / t[10] for t in runs),
                        }
                        for (label, clock_name), runs in results.items()
                        if runs
                    ],
                }
            )
        )
    late = 997
    if args.unbounded:
        for label, stream in (
            ("slot cache", EngineStream(model, fmt, device)),
            ("DynamicCache", streams["DynamicCache"]),
        ):
            t = frame_latencies(stream, model, fmt, 1000, [10, late], device)["wall"]
            print(
                f"{label}, unbounded: frame 10 {1000 * t[10]:.2f} ms, frame {late} (~{system + late * 8} tokens) "
                f"{1000 * t[late]:.2f} ms, ratio {t[late] / t[10]:.2f}"
            )
    if args.full:
        t = frame_latencies(EngineStream(model, fmt, device, use_cache=False), model, fmt, 1000, [10, late], device)[
            "wall"
        ]
        print(
            f"without cache: frame 10 {1000 * t[10]:.2f} ms, frame {late} {1000 * t[late]:.2f} ms, "
            f"ratio {t[late] / t[10]:.2f}"
        )


if __name__ == "__main__":
    main()
