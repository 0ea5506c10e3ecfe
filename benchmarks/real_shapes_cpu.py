"""CPU time of `dst prepare` -> `dst train` (LoRA, full) -> `dst eval` on the real SmolVLM2 shapes, random weights.

    python benchmarks/real_shapes_cpu.py [--shapes 2.2B] [--frames 3] [--text-layers 1] [--vision-layers 1]
                                         [--threads 1] [--out DIR] [--json]

What tests/test_real_shapes.py runs for 256M and 500M, for any shape: one short video at 384 px (two
conversations, `--frames` frames at 2 fps), a model folder of the shape with SmolVLM2's tokenizer
(benchmarks/real_shapes.py), `dst prepare --tokens-per-frame all`, one training step with LoRA and one with full
fine-tuning (fp32 on the CPU), and `dst eval` from each checkpoint (`--batch-dialogues 1`, METEOR off). The 2.2B
shape is here and not in the tests: its 49,280 x 2,048 embeddings and LM head are 0.8 GB in fp32, and it takes
about a minute of CPU. Each phase's wall and process CPU time is printed (on a shared machine the CPU time is the
steadier); `--out` keeps the folders (default: a temporary folder, removed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from real_shapes import real_tokenizer, shape_folder, short_video, standin_tokenizer, sts_standin  # noqa: E402

from eval import metrics_text  # noqa: E402
from eval.config import EvalConfig, StreamConfig  # noqa: E402
from eval.evaluate import run as eval_run  # noqa: E402
from pipeline import prepare  # noqa: E402
from pipeline.config import PrepareConfig  # noqa: E402
from train import run as train_run  # noqa: E402
from train.config import resolve  # noqa: E402


def timed(rows: list[dict], shape: str, phase: str, call):
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    rows.append(
        {"shape": shape, "phase": phase, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    )
    print(f"{shape} {phase}: {rows[-1]['wall_s']:.1f} s wall, {rows[-1]['cpu_s']:.1f} s CPU", flush=True)
    return result


def run_shape(shape: str, tmp: Path, tokenizer, data: tuple[Path, Path], args, sts: str) -> list[dict]:
    rows: list[dict] = []
    folder = tmp / shape / "model"
    info = timed(
        rows,
        shape,
        "build model folder",
        lambda: shape_folder(shape, folder, tokenizer, text_layers=args.text_layers, vision_layers=args.vision_layers),
    )
    shards = tmp / shape / "shards"
    timed(
        rows,
        shape,
        f"dst prepare ({info['tokens_per_frame']} tokens/frame, {args.frames} frames)",
        lambda: prepare.run(
            PrepareConfig(
                split="train",
                dst_json=(data[0],),
                model=str(folder),
                out=shards,
                frames_root=data[1],
                tokens_per_frame="all",
                workers=0,
            )
        ),
    )
    for mode in ("lora", "full"):
        run = tmp / shape / mode
        timed(
            rows,
            shape,
            f"dst train, {mode}, 1 step",
            lambda run=run, mode=mode: train_run.run(
                resolve(
                    {
                        "shards": shards,
                        "model": str(folder),
                        "out": run,
                        "max_steps": 1,
                        "lora": mode == "lora",
                        "batch_size": "512",
                        "max_seq_len": 512,
                        "num_workers": 0,
                        "warmup_steps": 1,
                    }
                )
            ),
        )
        timed(
            rows,
            shape,
            f"dst eval from the {mode} checkpoint",
            lambda run=run, mode=mode: eval_run(
                EvalConfig(
                    shards=shards,
                    out=tmp / shape / f"eval-{mode}",
                    ckpt=run / "checkpoints" / "last",
                    stream=StreamConfig(max_new_tokens=2),
                    sts_model=sts,
                )
            ),
        )
    for row in rows:
        row["parameters"] = info["parameters"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="2.2B", help="comma-separated: 256M, 500M, 2.2B")
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--text-layers", type=int, default=1)
    parser.add_argument("--vision-layers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="keep the folders here (default: temporary)")
    parser.add_argument("--json", action="store_true", help="end with a RESULT {json} line")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    metrics_text.java_missing_reason = lambda: "off in this benchmark (METEOR's JVM costs seconds)"
    tokenizer, source = real_tokenizer()
    if tokenizer is None:
        print(f"warning: {source}; using the stand-in tokenizer", flush=True)
        tokenizer, source = standin_tokenizer()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.out or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        data = short_video(tmp / "data", args.frames)
        sts = str(sts_standin(tmp / "sts"))
        rows = [row for shape in args.shapes.split(",") for row in run_shape(shape, tmp, tokenizer, data, args, sts)]
    print(
        f"\ntokenizer: {source}; torch {torch.__version__}, {args.threads} thread(s), {args.text_layers} text "
        f"and {args.vision_layers} vision layer(s)\n"
    )
    print("| shape | phase | wall s | CPU s |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['shape']} | {row['phase']} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} |")
    if args.json:
        print("RESULT " + json.dumps({"tokenizer": source, "rows": rows}))


if __name__ == "__main__":
    main()
