"""`dst experiment --config FILE --out DIR [--fast]`: a grid of train + eval cells over one prepared dataset.

    OUT/experiment.json          what the folder is bound to (data, fast); a rerun must agree
    OUT/data/                    the synthetic videos ([data] setting, sizes, seed), generated once
    OUT/shards/{train,val,test}  prepared once
    OUT/runs/<train settings>/seed-N/        one training run, shared by cells that differ only in eval settings
    OUT/cells/<cell>/seed-N/{val,test}/      `dst eval` outputs (val: threshold sweep; test: those thresholds)
    OUT/cells/<cell>/seed-N/result.json      the cell's results line; its presence means "done, never redo"
    OUT/baselines/<mode>/                    test-only baselines ([experiment] baselines)
    OUT/results.jsonl, OUT/summary.md, OUT/report.html   rewritten (atomically) after every finished cell

Re-scoring (`--rescore`): every finished cell and baseline is scored again from its saved predictions with this
code's metrics (what `dst score` does), its metrics.json and results line replaced, and the reports rewritten;
nothing is trained or streamed, so predictions and the thresholds picked on val stay as they were. For results
streamed by an earlier commit whose metric definitions have changed since (the line keeps the `git_commit` that
streamed it and gains `rescored`: the commit that scored it).

Resuming: a killed grid is rerun with the same command. Finished cells are skipped; a training run with a
checkpoint resumes from it (`dst train --resume`, exact), one without is started over; an eval split without its
done marker is run again (eval writes its outputs atomically, so nothing half-written is ever read).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress_bar import ProgressBar
from rich.table import Table

from core.errors import InputError
from core.files import write_atomic
from eval import evaluate as eval_run
from eval.config import EvalConfig, ScoreConfig, StreamConfig, offline_sts_model
from experiments.config import ExperimentRunConfig
from experiments.grid import EVAL_KEYS, STREAM_KEYS, Cell, ExperimentConfig, load
from experiments.report import flatten, write_reports
from pipeline import prepare
from pipeline.config import PrepareConfig
from synthetic import long_videos, tasks
from train import run as train_run
from train.checkpoint import TRAINER_STATE
from train.config import resolve as resolve_train

GENERATORS = {"demo": tasks.generate, "long": long_videos.generate}
SPLITS = ("train", "val", "test")


class ExperimentError(InputError):
    """The output folder does not fit the config, or a step stopped before it finished."""


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _load() -> float:
    return round(os.getloadavg()[0], 2)


# ----------------------------------------------------------------------------------------------- the folder


def check_out(cfg: ExperimentConfig, out: Path) -> None:
    """Refuse an output folder made for other data, or whose cells were run with other settings, before anything
    runs. Adding cells or seeds to a config and rerunning into the same folder is fine."""
    bound = _read(out / "experiment.json")
    if bound is not None and bound["identity"] != cfg.identity():
        diff = [k for k in cfg.identity() if bound["identity"].get(k) != cfg.identity()[k]]
        raise ExperimentError(f"{out} holds an experiment with other {', '.join(diff)} ({bound['identity']}); "
                              f"use another --out")
    for cell in cfg.cells:
        stored = _read(out / "cells" / cell.slug / "cell.json")
        if stored is not None and stored != _cell_record(cell):
            raise ExperimentError(f"{out}: cell {cell.name!r} was run with other settings ({stored}); its results "
                                  "would not match the config: use another --out or restore the config")


def _cell_record(cell: Cell) -> dict:
    return json.loads(json.dumps({"grid": cell.grid, "train": cell.train, "eval": cell.eval}))


def prepare_data(cfg: ExperimentConfig, out: Path, console: Console) -> dict[str, Path]:
    data = cfg.data
    marker = out / "data" / "generated.json"
    if not marker.is_file():
        console.rule(f"generate the {data['setting']} synthetic videos {data['videos']} (seed {data['seed']})")
        summary = GENERATORS[data["setting"]](out / "data", *data["videos"], seed=data["seed"])
        write_atomic(marker, json.dumps(summary, indent=1))
    generated = json.loads(marker.read_text())
    shards = {}
    for split in SPLITS:
        shards[split] = out / "shards" / split
        if (shards[split] / "manifest.json").is_file():
            continue
        console.rule(f"prepare {split}")
        prepare.run(PrepareConfig(split=split, dst_json=(Path(generated["splits"][split]["json"]),),
                                  model=data["model"], out=shards[split], frames_root=Path(generated["frames_root"]),
                                  tokens_per_frame=data["tokens_per_frame"], batch_size=64), console)
    return shards


# ----------------------------------------------------------------------------------------------- one cell


def train_cell(cfg: ExperimentConfig, cell: Cell, seed: int, out: Path, shards: dict[str, Path],
               console: Console) -> dict:
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
    train_cfg = resolve_train({**cell.train, "shards": shards["train"], "val_shards": shards["val"],
                               "model": cfg.data["model"], "out": run_dir, "seed": seed, "resume": resume})
    load_before, started = _load(), time.time()
    train_run.run(train_cfg, console)
    step = json.loads((last / TRAINER_STATE).read_text())["step"]
    if step < train_cfg.max_steps:  # SIGTERM: dst train saved a checkpoint and returned early
        raise ExperimentError(f"training {run_dir} stopped at step {step} of {train_cfg.max_steps}; rerun the same "
                              "command to resume it")
    done = {"train_s": round(time.time() - started, 1), "steps": step, "resumed": resume, "trained_for": cell.slug,
            "load_1m": [load_before, _load()], "config": train_cfg.to_json()}
    write_atomic(marker, json.dumps(done, indent=1))
    return {**done, "reused": False}


def eval_split(cell: Cell, folder: Path, shards: Path, ckpt: Path | None, console: Console, *, sweep=False,
               thresholds_from: Path | None = None, mode: str = "model") -> dict:
    """One `dst eval`; returns its done marker (seconds). Skipped when the marker exists."""
    marker = folder / "done.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    e = cell.eval
    stream = StreamConfig(mode=mode, **{k: e[k] for k in EVAL_KEYS if k in STREAM_KEYS})
    cfg = EvalConfig(shards=shards, out=folder, ckpt=ckpt, stream=stream, sweep=sweep, thresholds_from=thresholds_from,
                     **{k: e[k] for k in EVAL_KEYS if k not in STREAM_KEYS and k != "sts_model"},
                     sts_model=e["sts_model"] or offline_sts_model())
    load_before, started = _load(), time.time()
    eval_run.run(cfg, console)
    done = {"eval_s": round(time.time() - started, 1), "load_1m": [load_before, _load()]}
    write_atomic(marker, json.dumps(done))
    return done


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


def run_cell(cfg: ExperimentConfig, cell: Cell, seed: int, out: Path, shards: dict[str, Path],
             console: Console) -> dict:
    folder = out / "cells" / cell.slug / f"seed-{seed}"
    write_atomic(out / "cells" / cell.slug / "cell.json", json.dumps(_cell_record(cell), indent=1))
    trained = train_cell(cfg, cell, seed, out, shards, console)
    ckpt = out / "runs" / cell.train_slug / f"seed-{seed}" / "checkpoints" / "last"
    val = eval_split(cell, folder / "val", shards["val"], ckpt, console, sweep=True)
    test = eval_split(cell, folder / "test", shards["test"], ckpt, console,
                      thresholds_from=folder / "val" / "thresholds.json")
    metrics = {split: json.loads((folder / split / "metrics.json").read_text()) for split in ("val", "test")}
    streams = {split: stream_stats(folder / split) for split in ("val", "test")}
    sweep = json.loads((folder / "val" / "thresholds.json").read_text())
    result = {
        "experiment": cfg.name, "cell": cell.name, "cell_index": cell.index, "grid": cell.grid, "seed": seed,
        "config": {"data": cfg.data, "train": {k: v for k, v in trained["config"].items()
                                               if k not in ("shards", "val_shards", "out", "resume")},
                   "eval": cell.eval, "fast": cfg.fast},
        "metrics": flatten(metrics),
        "stream": flatten(streams),
        "thresholds": {ds: {"update": v["update"]["best"], "speak": v["speak"]["best"]}
                       for ds, v in sweep["datasets"].items()},
        "timings": {"train_s": trained["train_s"], "train_reused": trained["reused"],
                    "train_resumed": trained["resumed"], "val_eval_s": val["eval_s"], "test_eval_s": test["eval_s"],
                    "load_1m": {"train": trained["load_1m"], "val": val["load_1m"], "test": test["load_1m"]},
                    "torch_threads": torch.get_num_threads()},
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
    result = {"experiment": cfg.name, "cell": f"baseline {mode}", "cell_index": None, "grid": {"mode": mode},
              "seed": None, "config": {"data": cfg.data, "eval": cell.eval, "fast": cfg.fast},
              "metrics": flatten(metrics), "stream": {}, "thresholds": {},
              "timings": {"test_eval_s": done["eval_s"], "load_1m": {"test": done["load_1m"]}},
              "git_commit": train_run.git_commit()}
    write_atomic(folder / "result.json", json.dumps(result))
    return result


# ----------------------------------------------------------------------------------------------- the grid


def collect(cfg: ExperimentConfig, out: Path) -> list[dict]:
    """Every finished result of this config, in grid order (cells, then seeds), baselines last."""
    lines = []
    for cell in cfg.cells:
        for seed in cfg.seeds:
            result = _read(out / "cells" / cell.slug / f"seed-{seed}" / "result.json")
            if result is not None:
                lines.append(result)
    for mode in cfg.baselines:
        result = _read(out / "baselines" / mode / "result.json")
        if result is not None:
            lines.append(result)
    return lines


def _status(console: Console, done: int, total: int, started: float, ran: int) -> None:
    elapsed = time.time() - started
    left = f", about {elapsed / ran * (total - done) / 60:.0f} min left" if ran and done < total else ""
    table = Table.grid(padding=(0, 1))
    table.add_row(ProgressBar(total=total, completed=done, width=40),
                  f"{done}/{total} cell runs done, {elapsed / 60:.1f} min{left}")
    console.print(table)


def run(rc: ExperimentRunConfig, console: Console | None = None) -> list[dict]:
    console = console or Console()
    cfg = load(rc.config, fast=rc.fast)  # every config error is raised here, before anything runs
    return run_experiment(cfg, rc.out, console, threads=rc.threads, rescore=rc.rescore)


def run_experiment(cfg: ExperimentConfig, out: Path, console: Console, threads: int | None = None,
                   rescore: bool = False) -> list[dict]:
    """The one chain of stages for `dst experiment` and `dst demo`: results lines of every finished cell."""
    check_out(cfg, out)
    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _rescore(cfg, out, console) if rescore else _run_grid(cfg, out, console)
    finally:
        torch.set_num_threads(default_threads)


def _rescore(cfg: ExperimentConfig, out: Path, console: Console) -> list[dict]:
    from eval.scoring import load_embedder

    if not (out / "experiment.json").is_file():
        raise ExperimentError(f"{out}: no experiment has run here; nothing to re-score")
    folders = [out / "cells" / c.slug / f"seed-{s}" for c in cfg.cells for s in cfg.seeds]
    folders += [out / "baselines" / mode for mode in cfg.baselines]
    finished = [f for f in folders if (f / "result.json").is_file()]
    embedders: dict[str, object] = {}
    commit = train_run.git_commit()
    for n, folder in enumerate(finished, 1):
        result = json.loads((folder / "result.json").read_text())
        e = result["config"]["eval"]
        sts = e["sts_model"] or offline_sts_model()
        if sts not in embedders:
            embedders[sts] = load_embedder(sts)
        splits = {"test": folder} if result["seed"] is None else {s: folder / s for s in ("val", "test")}
        metrics = {}
        for split, where in splits.items():  # what `dst score` does, with the embedder loaded once
            score = ScoreConfig(where / "predictions.jsonl", where / "metrics.json", sts, e["protocol"],
                                e["dst_window"])
            metrics[split] = eval_run.score_file(score, Console(quiet=True), embed=embedders[sts])
        result["metrics"] = flatten(metrics)
        result["rescored"] = {"git_commit": commit}
        write_atomic(folder / "result.json", json.dumps(result))
        console.print(f"[{n}/{len(finished)}] re-scored {folder.relative_to(out)}", highlight=False)
    lines = collect(cfg, out)
    write_reports(cfg, out, lines)
    console.print(f"re-scored {len(finished)} results of {len(folders)} cell runs and baselines: "
                  f"{out / 'results.jsonl'}, {out / 'summary.md'}", highlight=False)
    return lines


def _run_grid(cfg: ExperimentConfig, out: Path, console: Console) -> list[dict]:
    write_atomic(out / "experiment.json", json.dumps({"identity": cfg.identity(), "config_file": str(cfg.path),
                                                      "config": cfg.raw}, indent=1, default=str))
    started = time.time()
    shards = prepare_data(cfg, out, console)
    for mode in cfg.baselines:
        console.rule(f"baseline {mode} on test")
        run_baseline(cfg, mode, out, shards, console)
    work = [(cell, seed) for cell in cfg.cells for seed in cfg.seeds]
    done = sum((out / "cells" / c.slug / f"seed-{s}" / "result.json").is_file() for c, s in work)
    ran, loop_started = 0, time.time()
    _status(console, done, len(work), loop_started, ran)
    for cell, seed in work:
        if (out / "cells" / cell.slug / f"seed-{seed}" / "result.json").is_file():
            continue  # finished: never redone
        console.rule(f"[{done + 1}/{len(work)}] {cell.name}, seed {seed}")
        run_cell(cfg, cell, seed, out, shards, console)
        done, ran = done + 1, ran + 1
        write_reports(cfg, out, collect(cfg, out))
        _status(console, done, len(work), loop_started, ran)
    lines = collect(cfg, out)
    write_reports(cfg, out, lines)
    console.print(f"experiment {cfg.name} done in {(time.time() - started) / 60:.1f} min: {out / 'results.jsonl'}, "
                  f"{out / 'summary.md'}, {out / 'report.html'}", highlight=False)
    return lines
