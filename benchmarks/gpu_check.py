"""The device check: the real `dst` commands on the real SmolVLM2 shapes, in one call of under 9 minutes on a GPU.

    benchmarks/gpu_check.sh --out DIR [--wheels DIR] [--tokenizer DIR] [--cap-gib 24]
    benchmarks/gpu_check.sh --out DIR --cpu-smoke          the same steps, tiny model, on the CPU (the tests)

Steps, in order, each with its own time budget (STEPS below; the budgets add up to less than the limit):
`deps` checks the installed packages against pyproject.toml's pins and installs what `--wheels` holds
(benchmarks/gpu_deps.py); `setup` writes synthetic task videos, random-weight model folders of the 256M, 2.2B
and 500M shapes (2 decoder layers, the full vision tower; SmolVLM2's tokenizer from `--tokenizer` or the
smollm2-135m cache) and a stand-in sentence model (benchmarks/real_shapes.py); then per shape `dst prepare
--tokens-per-frame all` (64 or 81 tokens per frame), `dst train` (LoRA, fp16 with GradScaler, `--batch-size auto`
under the memory cap, checkpoints at steps 2 and 4, then `--resume` to step 6; 256M also full fine-tuning) and
`dst eval` from that fp16 checkpoint with `--batch-dialogues` 1, 8 and 16. Every command runs in one worker
process (benchmarks/gpu_launch.py, driven by benchmarks/gpu_worker.py), which caps its memory to `--cap-gib` (a
24 GB Titan RTX), turns SDPA's flash kernel off (Turing has none) and times the encoder, the training loop and
the streaming. `benchmarks/gpu_kit.sh` gathers the tokenizer and wheels for a machine without network.

A step that fails, runs out of time (`timed_out`) or lacks the step it needs (`skipped`) is reported as such.
Everything is written under `--out` (the run's folders, the logs, gpu_check.json and gpu_check.md); nothing in
the repository changes. The numbers are for the record in docs/benchmarks.md, by hand, with the card's name.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_deps  # noqa: E402  (beside this file, not a package)
import gpu_report  # noqa: E402
from gpu_worker import Worker, tail  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
# The time table (seconds). A step is killed at its budget (or at what is left of the limit); the limit keeps
# REPORT_S for writing the report. The shapes run in the order of what matters most on a 24 GB card.
LIMIT_S = {"gpu": 540, "cpu-smoke": 120}
REPORT_S = 10
STEPS = {
    "gpu": (
        ("deps", 40),  # pip unpacking polars's runtime (54 MB) takes a while
        ("setup", 50),
        ("prepare-256M", 30),
        ("train-256M", 60),
        ("train-full-256M", 25),
        ("eval-256M", 45),
        ("prepare-2.2B", 30),
        ("train-2.2B", 75),
        ("eval-2.2B", 45),
        ("prepare-500M", 30),
        ("train-500M", 45),
        ("eval-500M", 40),
    ),
    "cpu-smoke": (  # about 15 s in all on the 2-core development machine; the rest is room for a loaded one
        ("deps", 5),
        ("setup", 35),
        ("prepare-tiny", 15),
        ("train-tiny", 25),
        ("train-full-tiny", 10),
        ("eval-tiny", 20),
    ),
}
for _mode, _steps in STEPS.items():  # the table must fit its limit, whatever is edited above
    assert sum(s for _, s in _steps) + REPORT_S <= LIMIT_S[_mode], f"{_mode}: step budgets exceed the limit"
NEEDS = {"prepare": "setup", "train": "prepare", "train-full": "prepare", "eval": "train"}
EVAL_BATCHES = (1, 8, 16)
TRAIN_STEPS = (4, 6)  # the first run stops at 4 (checkpoints at 2 and 4), --resume continues to 6
TURING_NOTE = (
    "SDPA's flash kernel was off (Turing has no FlashAttention) and the process was capped to the memory of a "
    "24 GB card, but Hopper numbers do not transfer to Turing as they are: an H100/H200 has several times the "
    "fp16 tensor throughput and memory bandwidth of a Titan RTX and far more CPU per GPU. Read them as upper "
    "bounds and ratios (batch sizes, B=1 vs B=16, LoRA vs full), not as Titan RTX rates."
)


def split(name: str) -> tuple[str, str | None]:
    """ "train-full-256M" -> ("train-full", "256M"); "deps" -> ("deps", None)."""
    kind, _, shape = name.rpartition("-")
    return (kind, shape) if kind else (name, None)


class Context:
    def __init__(self, args, mode: str):
        self.mode, self.out, self.args = mode, args.out, args
        self.work, self.logs = args.out / "work", args.out / "steps"
        self.gpu = mode == "gpu"
        self.site: str | None = None
        self.setup: dict = {}
        self.stand_in_coco = False

    def env(self) -> dict:
        path = [p for p in (self.site, str(ROOT), os.environ.get("PYTHONPATH")) if p]
        # one thread on the CPU: on a shared 2-core machine two torch threads mostly wait for each other
        threads = {} if self.gpu else {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        return {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(path),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **threads,
        }

    def worker_flags(self) -> list[str]:
        flags = ["--no-meteor"] + (["--stand-in-coco"] if self.stand_in_coco else [])
        return flags + (["--cap-gib", str(self.args.cap_gib), "--no-flash"] if self.gpu else [])

    def shapes(self) -> list[str]:
        return [split(name)[1] for name, _ in STEPS[self.mode] if split(name)[0] == "prepare"]


def _opts(**values) -> list[str]:
    """`--key value` pairs, in order (`max_steps=4` -> `--max-steps 4`)."""
    return [item for key, value in values.items() for item in (f"--{key.replace('_', '-')}", str(value))]


def commands(kind: str, shape: str, ctx: Context) -> list[list[str]]:
    """The `dst` argument lists of one step."""
    data, model = ctx.setup["data"], ctx.setup["models"][shape]["folder"]
    device = "cuda" if ctx.gpu else "cpu"
    shards, runs = str(ctx.work / "shards" / shape), ctx.work / "runs"
    if kind == "prepare":
        options = _opts(
            split="train",
            dst_json=data["dst_json"],
            frames_root=data["frames_root"],
            model=model,
            out=shards,
            tokens_per_frame="all",
            device=device,
            workers=4 if ctx.gpu else 0,
        )
        return [["prepare", *options]]
    base = [
        "train",
        *_opts(
            shards=shards,
            model=model,
            precision="fp16" if ctx.gpu else "fp32",
            batch_size="auto",
            memory_fraction=0.9,
            max_seq_len=4096 if ctx.gpu else 512,
            log_every=1,
            warmup_steps=1,
            save_every=2,
            num_workers=2 if ctx.gpu else 0,
            device=device,
        ),
    ]
    if kind == "train":
        run = runs / f"{shape}-lora"
        return [
            [*base, *_opts(out=run, max_steps=TRAIN_STEPS[0])],
            [*base, *_opts(out=run, max_steps=TRAIN_STEPS[1]), "--resume"],
        ]
    if kind == "train-full":
        return [[*base, "--full", *_opts(out=runs / f"{shape}-full", max_steps=2)]]
    if kind == "eval":
        # B = 1, the slow one, streams 2 of the 6 videos (3 conversations each); the smoke run 1 of 2 throughout
        videos = {1: 2, 8: None, 16: None} if ctx.gpu else {1: 1, 8: 1, 16: 1}
        ckpt = runs / f"{shape}-lora" / "checkpoints" / "last"
        return [
            [
                "eval",
                *_opts(
                    shards=shards,
                    ckpt=ckpt,
                    out=ctx.work / "eval" / f"{shape}-b{b}",
                    batch_dialogues=b,
                    max_new_tokens=8 if ctx.gpu else 4,
                    sts_model=ctx.setup["sts_model"],
                    device=device,
                ),
            ]
            + (_opts(max_videos=videos[b]) if videos[b] else [])
            for b in EVAL_BATCHES
        ]
    raise ValueError(f"unknown step kind {kind!r}")


def run_step(name: str, budget: float, ctx: Context, worker: Worker) -> dict:
    kind, shape = split(name)
    step: dict = {"name": name, "budget_s": budget}
    started = time.monotonic()
    if kind == "deps":
        try:
            report = gpu_deps.check(ctx.out, ctx.args.wheels, timeout=budget)
        except subprocess.TimeoutExpired:
            return {**step, "status": "timed_out", "elapsed_s": budget, "reason": f"pip ran past its {budget:g} s"}
        except gpu_deps.InstallError as exc:
            return {**step, "status": "failed", "elapsed_s": time.monotonic() - started, "reason": str(exc)}
        ctx.site = report["site"]
        ctx.stand_in_coco = "pycocoevalcap" in report["stand_ins"]
        return {**step, "status": "ok", "elapsed_s": time.monotonic() - started, "deps": report}
    log, probe = ctx.logs / f"{name}.log", ctx.logs / f"{name}.jsonl"
    if kind == "setup":
        args = {
            "out": str(ctx.work),
            "shapes": ctx.shapes(),
            "text_layers": 2,
            "device": "cuda" if ctx.gpu else "cpu",
            "tokenizer_dir": str(ctx.args.tokenizer) if ctx.args.tokenizer else None,
            "videos": 6 if ctx.gpu else 2,
            "size": 384 if ctx.gpu else 64,
        }
        status = worker.run({"kind": "setup", "args": args, "log": str(log), "probe": str(probe)}, budget)
        if status == "ok":
            ctx.setup = json.loads(probe.read_text())
        step |= {"status": status, "elapsed_s": time.monotonic() - started, "setup": ctx.setup or None}
        if status == "timed_out":
            step["reason"] = f"ran past its {budget:g} s"
        return step if status == "ok" else {**step, "log_tail": tail(log)}
    argv_lists = commands(kind, shape, ctx)
    status = worker.run({"kind": "dst", "commands": argv_lists, "log": str(log), "probe": str(probe)}, budget)
    lines = [json.loads(line) for line in probe.read_text().splitlines()] if probe.exists() else []
    step |= {
        "status": status,
        "elapsed_s": time.monotonic() - started,
        "commands": lines[1:],
        "device": lines[0]["device"] if lines else None,
    }
    if status == "timed_out":
        step["reason"] = f"ran past its {budget:g} s; {len(lines[1:])} of {len(argv_lists)} commands finished"
    if status != "ok":
        step["log_tail"] = tail(log)
    if kind.startswith("train"):
        step["runs"] = gpu_report.train_runs(ctx.work / "runs" / f"{shape}-{'full' if 'full' in kind else 'lora'}")
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for everything this check writes")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same steps, tiny model, on the CPU")
    parser.add_argument("--wheels", type=Path, default=None, help="folder of wheels to pip install --no-index")
    parser.add_argument("--tokenizer", type=Path, default=None, help="folder with SmolVLM2's tokenizer.json")
    parser.add_argument("--cap-gib", type=float, default=24.0, help="per-process CUDA memory cap (GiB)")
    parser.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="STEP=SECONDS",
        help="a shorter budget for one step than the table's (to try the time-out path)",
    )
    args = parser.parse_args()
    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    budgets = dict(STEPS[mode])
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in budgets or not seconds.replace(".", "", 1).isdigit() or float(seconds) > budgets[name]:
            raise SystemExit(
                f"gpu_check: --budget {item}: give STEP=SECONDS with a step of {list(budgets)} and at "
                "most its budget in the table"
            )
        budgets[name] = float(seconds)
    if mode == "gpu" and not gpu_report.cuda_available():
        raise SystemExit("gpu_check: no CUDA GPU here; --cpu-smoke runs the same steps on the CPU")
    args.out = args.out.resolve()
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"gpu_check: --out {args.out} is not empty; give a new folder")
    ctx = Context(args, mode)
    ctx.work.mkdir(parents=True)
    ctx.logs.mkdir(parents=True)
    started = time.monotonic()
    done: dict[str, str] = {}
    steps = []
    worker = Worker(ctx.logs, ctx.work, lambda: (ctx.env(), ctx.worker_flags()))
    for name, budget in budgets.items():
        kind, shape = split(name)
        needed = f"{NEEDS[kind]}-{shape}" if kind in NEEDS and NEEDS[kind] != "setup" else NEEDS.get(kind)
        left = LIMIT_S[mode] - REPORT_S - (time.monotonic() - started)
        if needed and done.get(needed) != "ok":
            step = {
                "name": name,
                "budget_s": budget,
                "status": "skipped",
                "reason": f"needs {needed}, which ended {done.get(needed, 'not run')}",
            }
        elif left < 1:
            step = {
                "name": name,
                "budget_s": budget,
                "status": "timed_out",
                "elapsed_s": 0.0,
                "reason": f"not started: the {LIMIT_S[mode]} s limit was spent",
            }
        else:
            print(f"gpu_check: {name} (budget {budget} s)", flush=True)
            step = run_step(name, min(budget, left), ctx, worker)
        done[name] = step["status"]
        steps.append(step)
        print(f"gpu_check: {name}: {step['status']}" + (f" ({step['reason']})" if "reason" in step else ""), flush=True)
    worker.close()
    report = {
        "mode": mode,
        "limit_s": LIMIT_S[mode],
        "budgets_s": budgets,
        "budgets_total_s": sum(budgets.values()),
        "elapsed_s": time.monotonic() - started,
        "cap_gib": args.cap_gib if mode == "gpu" else None,
        "notes": [TURING_NOTE]
        if mode == "gpu"
        else ["CPU smoke run: tiny model, tiny budgets; it checks the check, its numbers are not measurements"],
        "commit": gpu_report.commit(ROOT),
        "steps": steps,
    }
    report["summary"] = gpu_report.summary(report)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    markdown = gpu_report.markdown(report)
    (args.out / "gpu_check.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
