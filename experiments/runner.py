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
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from rich.console import Console
from rich.progress_bar import ProgressBar
from rich.table import Table

from core.files import write_atomic
from eval import evaluate as eval_run
from eval.config import ScoreConfig, offline_sts_model
from experiments.cell import ExperimentError, cell_record, run_baseline, run_cell
from experiments.config import ExperimentRunConfig
from experiments.grid import Cell, ExperimentConfig, load
from experiments.report import flatten, write_reports
from pipeline import prepare
from pipeline.config import PrepareConfig
from synthetic import long_videos, tasks
from train import run as train_run

GENERATORS = {"demo": tasks.generate, "long": long_videos.generate}
SPLITS = ("train", "val", "test")


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# ----------------------------------------------------------------------------------------------- the folder


def check_out(cfg: ExperimentConfig, out: Path) -> None:
    """Refuse an output folder made for other data, or whose cells were run with other settings, before anything
    runs. Adding cells or seeds to a config and rerunning into the same folder is fine."""
    bound = _read(out / "experiment.json")
    if bound is not None and bound["identity"] != cfg.identity():
        diff = [k for k in cfg.identity() if bound["identity"].get(k) != cfg.identity()[k]]
        raise ExperimentError(
            f"{out} holds an experiment with other {', '.join(diff)} ({bound['identity']}); use another --out"
        )
    for cell in cfg.cells:
        stored = _read(out / "cells" / cell.slug / "cell.json")
        if stored is not None and stored != cell_record(cell):
            raise ExperimentError(
                f"{out}: cell {cell.name!r} was run with other settings ({stored}); its results "
                "would not match the config: use another --out or restore the config"
            )


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
        prepare.run(
            PrepareConfig(
                split=split,
                dst_json=(Path(generated["splits"][split]["json"]),),
                model=data["model"],
                out=shards[split],
                frames_root=Path(generated["frames_root"]),
                tokens_per_frame=data["tokens_per_frame"],
                batch_size=64,
            ),
            console,
        )
    return shards


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
    table.add_row(
        ProgressBar(total=total, completed=done, width=40),
        f"{done}/{total} cell runs done, {elapsed / 60:.1f} min{left}",
    )
    console.print(table)


def run(rc: ExperimentRunConfig, console: Console | None = None) -> list[dict]:
    console = console or Console()
    cfg = load(rc.config, fast=rc.fast)  # every config error is raised here, before anything runs
    return run_experiment(cfg, rc.out, console, threads=rc.threads, rescore=rc.rescore, jobs=rc.jobs)


def run_experiment(
    cfg: ExperimentConfig, out: Path, console: Console, threads: int | None = None, rescore: bool = False, jobs: int = 1
) -> list[dict]:
    """The one chain of stages for `dst experiment` and `dst demo`: results lines of every finished cell."""
    check_out(cfg, out)
    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        if rescore:
            return _rescore(cfg, out, console)
        return _run_grid(cfg, out, console, jobs, threads)
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
            score = ScoreConfig(
                where / "predictions.jsonl", where / "metrics.json", sts, e["protocol"], e["dst_window"]
            )
            metrics[split] = eval_run.score_file(score, Console(quiet=True), embed=embedders[sts])
        result["metrics"] = flatten(metrics)
        result["rescored"] = {"git_commit": commit}
        write_atomic(folder / "result.json", json.dumps(result))
        console.print(f"[{n}/{len(finished)}] re-scored {folder.relative_to(out)}", highlight=False)
    lines = collect(cfg, out)
    write_reports(cfg, out, lines)
    console.print(
        f"re-scored {len(finished)} results of {len(folders)} cell runs and baselines: "
        f"{out / 'results.jsonl'}, {out / 'summary.md'}",
        highlight=False,
    )
    return lines


def groups(cfg: ExperimentConfig, out: Path) -> list[list[tuple[Cell, int]]]:
    """The unfinished cell runs, grouped by the training run they share (cells that differ only in eval settings),
    in grid order: the groups are independent of each other, the cells of a group run one after the other."""
    by_run: dict[tuple[str, int], list[tuple[Cell, int]]] = {}
    for cell in cfg.cells:
        for seed in cfg.seeds:
            if not (out / "cells" / cell.slug / f"seed-{seed}" / "result.json").is_file():
                by_run.setdefault((cell.train_slug, seed), []).append((cell, seed))
    return list(by_run.values())


def _run_group(
    cfg: ExperimentConfig, group: list[tuple[Cell, int]], out: Path, shards: dict[str, Path], threads: int, log: Path
) -> list[str]:
    """A worker process's share (`--jobs`): one training run and its cells, logged to `log`."""
    torch.set_num_threads(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        console = Console(file=f, width=120)
        for cell, seed in group:
            console.rule(f"{cell.name}, seed {seed}")
            run_cell(cfg, cell, seed, out, shards, console)
    return [f"{cell.name}, seed {seed}" for cell, seed in group]


def _run_grid(
    cfg: ExperimentConfig, out: Path, console: Console, jobs: int = 1, threads: int | None = None
) -> list[dict]:
    write_atomic(
        out / "experiment.json",
        json.dumps(
            {"identity": cfg.identity(), "config_file": str(cfg.path), "config": cfg.raw}, indent=1, default=str
        ),
    )
    started = time.time()
    shards = prepare_data(cfg, out, console)
    for mode in cfg.baselines:
        console.rule(f"baseline {mode} on test")
        run_baseline(cfg, mode, out, shards, console)
    total = len(cfg.cells) * len(cfg.seeds)
    todo = groups(cfg, out)
    done, ran, loop_started = total - sum(map(len, todo)), 0, time.time()
    _status(console, done, total, loop_started, ran)
    if jobs == 1:  # in grid order: cells, then seeds
        for cell, seed in sorted((item for group in todo for item in group), key=lambda x: (x[0].index, x[1])):
            console.rule(f"[{done + 1}/{total}] {cell.name}, seed {seed}")
            run_cell(cfg, cell, seed, out, shards, console)
            done, ran = done + 1, ran + 1
            write_reports(cfg, out, collect(cfg, out))
            _status(console, done, total, loop_started, ran)
    else:  # independent training runs in parallel processes; each writes what one process would
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {
                pool.submit(
                    _run_group,
                    cfg,
                    group,
                    out,
                    shards,
                    threads or 1,
                    out / "logs" / f"{group[0][0].train_slug}-seed-{group[0][1]}.log",
                ): group
                for group in todo
            }
            for future in as_completed(futures):
                for name in future.result():
                    console.print(f"finished {name}", highlight=False)
                done, ran = done + len(futures[future]), ran + len(futures[future])
                write_reports(cfg, out, collect(cfg, out))
                _status(console, done, total, loop_started, ran)
    lines = collect(cfg, out)
    write_reports(cfg, out, lines)
    console.print(
        f"experiment {cfg.name} done in {(time.time() - started) / 60:.1f} min: {out / 'results.jsonl'}, "
        f"{out / 'summary.md'}, {out / 'report.html'}",
        highlight=False,
    )
    return lines
