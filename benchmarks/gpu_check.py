"""The GPU measurements docs/benchmarks.md lists as missing, in one run (`benchmarks/gpu_check.sh`).

On one CUDA GPU, in priority order and within `--budget-s` (default 450 s, so the whole check stays under 8
minutes): `dst prepare`'s frames/s and peak memory for the 256M/500M/2.2B shapes; `dst train` tokens/s and the
token budget `--batch-size auto` picks under fp16 with `--memory-fraction 0.9` (256M LoRA and full, 2.2B LoRA,
500M LoRA and full); streaming frames/s of the 256M shape early and at the fullest context; batched eval
conversations/s for `--batch-dialogues` 1, 4, 8, 16. Every measurement runs the benchmark script in its own
process (each reads its own peak memory) and ends with its `RESULT {json}` line; a step that fails, times out or
no longer fits the budget gets a row saying so. The rows are appended to `--docs` under a dated heading with the
GPU's name. Models are randomly initialised real shapes: nothing is downloaded.

`--cpu-smoke` runs the same scripts with tiny sizes on the CPU in seconds and labels its section as such; the test
suite runs it on a copy of the docs so this check cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["--tokens", "auto", "--memory-fraction", "0.9", "--max-seq-len", "4096", "--steps", "5", "--videos", "8",
         "--json"]
# (kind, script arguments, seconds it may take at most): in priority order
GPU_STEPS = [
    ("prepare", ["prepare_throughput.py", "--frames", "256", "--shapes", "256M,500M,2.2B", "--skip-workers",
                 "--json"], 120),
    ("train", ["train_step.py", "--model", "256M", *TRAIN], 75),
    ("stream", ["stream_latency.py", "--model", "256M", "--repeats", "1", "--json"], 60),
    ("eval", ["eval_throughput.py", "--model", "256M", "--batches", "1,4,8,16", "--conversations", "16",
              "--frames", "120", "--repeats", "1", "--json"], 90),
    ("train", ["train_step.py", "--model", "256M", "--full", *TRAIN], 75),
    ("train", ["train_step.py", "--model", "2.2B", *TRAIN], 100),
    ("train", ["train_step.py", "--model", "500M", *TRAIN], 75),
    ("train", ["train_step.py", "--model", "500M", "--full", *TRAIN], 75),
]
SMOKE_STEPS = [
    ("prepare", ["prepare_throughput.py", "--frames", "8", "--batch-size", "8", "--shapes", "tiny-random",
                 "--skip-workers", "--json"], 120),
    ("train", ["train_step.py", "--model", "tiny-random", "--tokens", "auto", "--max-seq-len", "512", "--steps", "2",
               "--videos", "4", "--frames", "60", "--workers", "0", "--json"], 120),
    ("stream", ["stream_latency.py", "--model", "tiny-random", "--max-context", "400", "--repeats", "1", "--json"],
     120),
    ("eval", ["eval_throughput.py", "--model", "tiny-random", "--batches", "1,2", "--conversations", "3", "--frames",
              "30", "--repeats", "1", "--max-new-tokens", "4", "--json"], 120),
]


def run_step(args: list[str], timeout: float) -> tuple[dict | None, str]:
    """(the script's RESULT, "") or (None, why it has none)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / args[0]), *args[1:]], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"failed (exit {proc.returncode}): {last[:200]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return None, "no RESULT line in its output"
    return json.loads(lines[-1][len("RESULT "):]), ""


def rows_for(kind: str, args: list[str], result: dict) -> list[str]:
    """Markdown table rows `| measurement | setting | result |` for one step's RESULT."""
    if kind == "prepare":
        out = []
        for r in result["rows"]:
            text = f"{r['frames_per_s']:.1f} frames/s"
            if r.get("peak_gib") is not None:
                text += f", peak {r['peak_gib']:.2f} GiB, {r['hours_for_3.4M_frames']:.1f} h for 3.4M frames"
            out.append(f"| prepare | {r['stage']} | {text} |")
        return out
    if kind == "train":
        peak = f"; peak {result['peak_gib']:.2f} GiB" if result["peak_gib"] is not None else ""
        pick = f"`--batch-size auto` picked {result['auto_pick']} tokens" if result["auto_pick"] is not None \
            else f"{result['token_budget']} tokens"
        return [f"| train | {result['model']} {result['mode']}, {result['precision']}, memory fraction "
                f"{result['memory_fraction']}, "
                f"max_seq_len {result['max_seq_len']}, {result['steps']} steps | {pick}; "
                f"{result['tokens_per_s']:,.0f} tokens/s{peak} |"]
    if kind == "stream":
        return [f"| stream | {result['model']}, {r['path']}, max_context {result['max_context']} | frame 10 "
                f"{r['frame_10_ms']:.1f} ms; frame {result['fullest_frame']} (~{result['context_tokens']} tokens) "
                f"{r['fullest_ms']:.1f} ms, ratio {r['ratio']:.2f}; {1000 / r['fullest_ms']:.0f} frames/s at the "
                f"fullest |" for r in result["rows"] if r["clock"] == "wall"]
    if kind == "eval":
        setting = " ".join(args[args.index("--conversations") + 1: args.index("--conversations") + 2]) \
            + " conversations x " + args[args.index("--frames") + 1] + " frames"
        return [f"| eval | {result['model']}, `--batch-dialogues {r['batch']}`, {setting} | "
                f"{r['conversations_per_s']:.3f} conversations/s, x{r['speedup']:.2f} over B=1, "
                f"{r['frames_per_s']:.1f} frames/s" + (f", peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] else "")
                + " |" for r in result["rows"]]
    raise ValueError(f"unknown measurement kind {kind!r}")


def commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks the check")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md", help="file to append to")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting steps after this long")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU here; --cpu-smoke checks the script on the CPU")
    steps = SMOKE_STEPS if args.cpu_smoke else GPU_STEPS
    started = time.monotonic()
    rows = []
    for kind, step_args, limit in steps:
        left = args.budget_s - (time.monotonic() - started)
        if left < min(limit, 30):
            rows.append(f"| {kind} | `{' '.join(step_args)}` | skipped: the time budget is spent |")
            continue
        print(f"gpu_check: {kind}: {' '.join(step_args)}", flush=True)
        result, why = run_step(step_args, min(limit, left))
        rows += rows_for(kind, step_args, result) if result else [f"| {kind} | `{' '.join(step_args)}` | {why} |"]
    elapsed = time.monotonic() - started
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    if args.cpu_smoke:
        title = f"### CPU smoke run of the GPU check, {date} (tiny sizes: not measurements)"
    else:
        props = torch.cuda.get_device_properties(0)
        title = f"### GPU check, {date}, {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    models = "tiny random models, fp32 on the CPU" if args.cpu_smoke else "randomly initialised real shapes, fp16"
    section = [title, "", f"`benchmarks/gpu_check.sh{' --cpu-smoke' if args.cpu_smoke else ''}`: {elapsed:.0f} s, "
               f"torch {torch.__version__}, commit {commit()}; {models}.", "",
               "| measurement | setting | result |", "|---|---|---|", *rows, ""]
    with open(args.docs, "a", encoding="utf-8") as docs:
        docs.write("\n" + "\n".join(section))
    print("\n".join(section))


if __name__ == "__main__":
    main()
