"""One cell of an experiment, and one baseline: train (or reuse, or resume), sweep thresholds on val, evaluate
test with them, the learning curve of its training run, and the cell's results line. The runner
(experiments/runner.py) calls these in its own process or in worker processes (`--jobs`).

    OUT/runs/<train settings>/seed-N/        one training run, shared by cells that differ only in eval settings
    OUT/runs/<train settings>/seed-N/curve.json   with [experiment] curves: val metrics of every kept checkpoint
    OUT/cells/<cell>/seed-N/{val,test}/      `dst eval` outputs (val: threshold sweep; test: those thresholds)
    OUT/cells/<cell>/seed-N/result.json      the cell's results line; its presence means "done, never redo"
    OUT/baselines/<mode>/                    test-only baselines ([experiment] baselines)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console

from core.errors import InputError
from core.files import write_atomic
from eval import evaluate as eval_run
from eval.config import EvalConfig, StreamConfig, offline_sts_model
from experiments.grid import EVAL_KEYS, STREAM_KEYS, Cell, ExperimentConfig
from experiments.report import flatten
from train import run as train_run
from train.checkpoint import TRAINER_STATE
from train.config import resolve as resolve_train


class ExperimentError(InputError):
    """The output folder does not fit the config, or a step stopped before it finished."""


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def cell_record(cell: Cell) -> dict:
    return json.loads(json.dumps({"grid": cell.grid, "train": cell.train, "eval": cell.eval}))


def train_cell(
    cfg: ExperimentConfig, cell: Cell, seed: int, out: Path, shards: dict[str, Path], console: Console
) -> dict:
    """Train (or resume, or reuse) this cell's run; returns its done marker, with `reused`: the run was trained for
    another cell (one that differs from this one in eval settings only)."""
    run_dir = out / "runs" / cell.train_slug / f"seed-{seed}"
    marker = run_dir / "done.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        return {**done, "reused": done["trained_for"] != cell.slug}
    last = run_dir / "checkpoints" / "last"
    resume = last.exists()
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)  # started, but killed before its first checkpoint: start over
    train_cfg = resolve_train(
        {
            **cell.train,
            "shards": shards["train"],
            "val_shards": shards["val"],
            "model": cfg.data["model"],
            "out": run_dir,
            "seed": seed,
            "resume": resume,
        }
    )
    load_before, started = _load(), time.time()
    train_run.run(train_cfg, console)
    step = json.loads((last / TRAINER_STATE).read_text())["step"]
    if step < train_cfg.max_steps:  # SIGTERM: dst train saved a checkpoint and returned early
        raise ExperimentError(
            f"training {run_dir} stopped at step {step} of {train_cfg.max_steps}; rerun the same command to resume it"
        )
    done = {
        "train_s": round(time.time() - started, 1),
        "steps": step,
        "resumed": resume,
        "trained_for": cell.slug,
        "load_1m": [load_before, _load()],
        "config": train_cfg.to_json(),
    }
    write_atomic(marker, json.dumps(done, indent=1))
    return {**done, "reused": False}


def eval_split(
    cell: Cell,
    folder: Path,
    shards: Path,
    ckpt: Path | None,
    console: Console,
    *,
    sweep=False,
    thresholds_from: Path | None = None,
    mode: str = "model",
) -> dict:
    """One `dst eval`; returns its done marker (seconds). Skipped when the marker exists."""
    marker = folder / "done.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    e = cell.eval
    stream = StreamConfig(mode=mode, **{k: e[k] for k in EVAL_KEYS if k in STREAM_KEYS})
    cfg = EvalConfig(
        shards=shards,
        out=folder,
        ckpt=ckpt,
        stream=stream,
        sweep=sweep,
        thresholds_from=thresholds_from,
        **{k: e[k] for k in EVAL_KEYS if k not in STREAM_KEYS and k != "sts_model"},
        sts_model=e["sts_model"] or offline_sts_model(),
    )
    load_before, started = _load(), time.time()
    eval_run.run(cfg, console)
    done = {"eval_s": round(time.time() - started, 1), "load_1m": [load_before, _load()]}
    write_atomic(marker, json.dumps(done))
    return done


def learning_curve(
    cfg: ExperimentConfig, cell: Cell, seed: int, out: Path, shards: dict[str, Path], console: Console
) -> list[dict]:
    """With [experiment] curves: val DST joint accuracy and speaking F1 (ProAssist's matching) of every checkpoint
    the training run kept (`save_every`, `keep_checkpoints = 0`), model mode at the default thresholds (0.5: the
    sweep picks thresholds for the final model only), the cell's context strategy; once per training run."""
    run_dir = out / "runs" / cell.train_slug / f"seed-{seed}"
    if not cfg.curves:
        return []
    if (run_dir / "curve.json").is_file():
        return json.loads((run_dir / "curve.json").read_text())
    points = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step-??????")):
        folder = run_dir / "curve" / ckpt.name
        eval_split(cell, folder, shards["val"], ckpt, console)
        mean = json.loads((folder / "metrics.json").read_text())["mean"]
        points.append(
            {
                "step": int(ckpt.name.removeprefix("step-")),
                "joint_accuracy": (mean.get("dst") or {}).get("joint_accuracy"),
                "speak_f1": mean["speak_proassist"]["f1"],
            }
        )
    write_atomic(run_dir / "curve.json", json.dumps(points, indent=1))
    return points


def stream_stats(folder: Path) -> dict:
    """Re-seeds per dialogue, read from predictions.jsonl (not a metric of metrics.json, but what the memory study
    is about)."""
    reseeds = dialogues = 0
    with open(folder / "predictions.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                dialogues += 1
                reseeds += len(json.loads(line).get("reseeds", []))
    return {"dialogues": dialogues, "reseeds_per_dialogue": reseeds / dialogues if dialogues else 0.0}


def run_cell(
    cfg: ExperimentConfig, cell: Cell, seed: int, out: Path, shards: dict[str, Path], console: Console
) -> dict:
    folder = out / "cells" / cell.slug / f"seed-{seed}"
    write_atomic(out / "cells" / cell.slug / "cell.json", json.dumps(cell_record(cell), indent=1))
    trained = train_cell(cfg, cell, seed, out, shards, console)
    curve = learning_curve(cfg, cell, seed, out, shards, console)
    ckpt = out / "runs" / cell.train_slug / f"seed-{seed}" / "checkpoints" / "last"
    val = eval_split(cell, folder / "val", shards["val"], ckpt, console, sweep=True)
    test = eval_split(
        cell, folder / "test", shards["test"], ckpt, console, thresholds_from=folder / "val" / "thresholds.json"
    )
    metrics = {split: json.loads((folder / split / "metrics.json").read_text()) for split in ("val", "test")}
    streams = {split: stream_stats(folder / split) for split in ("val", "test")}
    sweep = json.loads((folder / "val" / "thresholds.json").read_text())
    result = {
        "experiment": cfg.name,
        "cell": cell.name,
        "cell_index": cell.index,
        "grid": cell.grid,
        "seed": seed,
        "config": {
            "data": cfg.data,
            "train": {k: v for k, v in trained["config"].items() if k not in ("shards", "val_shards", "out", "resume")},
            "eval": cell.eval,
            "fast": cfg.fast,
        },
        "metrics": flatten(metrics),
        "stream": flatten(streams),
        "thresholds": {
            ds: {"update": v["update"]["best"], "speak": v["speak"]["best"]} for ds, v in sweep["datasets"].items()
        },
        "curve": curve,
        "timings": {
            "train_s": trained["train_s"],
            "train_reused": trained["reused"],
            "train_resumed": trained["resumed"],
            "val_eval_s": val["eval_s"],
            "test_eval_s": test["eval_s"],
            "load_1m": {"train": trained["load_1m"], "val": val["load_1m"], "test": test["load_1m"]},
            "torch_threads": torch.get_num_threads(),
        },
        "git_commit": train_run.git_commit(),
    }
    write_atomic(folder / "result.json", json.dumps(result))
    return result


def run_baseline(cfg: ExperimentConfig, mode: str, out: Path, shards: dict[str, Path], console: Console) -> dict:
    folder = out / "baselines" / mode
    if (folder / "result.json").is_file():
        return json.loads((folder / "result.json").read_text())
    cell = cfg.cells[0]
    done = eval_split(cell, folder, shards["test"], None, console, mode=mode)
    metrics = {"test": json.loads((folder / "metrics.json").read_text())}
    result = {
        "experiment": cfg.name,
        "cell": f"baseline {mode}",
        "cell_index": None,
        "grid": {"mode": mode},
        "seed": None,
        "config": {"data": cfg.data, "eval": cell.eval, "fast": cfg.fast},
        "metrics": flatten(metrics),
        "stream": {},
        "thresholds": {},
        "timings": {"test_eval_s": done["eval_s"], "load_1m": {"test": done["load_1m"]}},
        "git_commit": train_run.git_commit(),
    }
    write_atomic(folder / "result.json", json.dumps(result))
    return result
