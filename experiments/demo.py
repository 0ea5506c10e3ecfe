"""`dst demo`: the whole pipeline on synthetic procedural tasks, offline on a CPU.

The demo is an experiment config (experiments/demos/{model}.toml: the synthetic `demo` setting, the settings chosen
for it, the `never`, `periodic` and `oracle` baselines) run by the experiment runner, the one chain of stages:
generate -> `dst prepare` -> `dst train` per variant -> `dst eval --sweep` on val -> `dst eval` on test with those
thresholds. The test split is used for nothing but the final numbers. Beside the runner's outputs (in
OUT/experiment/) it writes OUT/summary.json (the summary columns of eval/columns.py, per variant and baseline) and
OUT/report.html (the test report of the first variant), and prints the comparison.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from core.errors import InputError
from core.files import write_atomic
from eval.columns import summary_columns
from experiments.config import DemoConfig
from experiments.grid import load
from experiments.runner import run_experiment

CONFIGS = Path(__file__).parent / "demos"


DEMO_MARKER = ".dst-demo"  # written first into every folder a demo creates: the only folders it ever deletes


class DemoFolderError(InputError):
    """--out names something the demo did not create: it is never deleted."""


def start_clean(out: Path) -> None:
    """A demo always starts clean (no stale shards or runs), but deletes only a folder an earlier demo made (it
    holds DEMO_MARKER); any other non-empty folder, a file or a link is refused."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DemoFolderError(
            f"--out {out} is not a folder (a file or a link): refusing to touch it; pick a new folder"
        )
    if out.exists():
        if (out / DEMO_MARKER).is_file():
            shutil.rmtree(out)
        elif any(out.iterdir()):
            raise DemoFolderError(
                f"--out {out} exists and was not created by dst demo (no {DEMO_MARKER} in it): "
                "refusing to delete it; pick a new or empty folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("created by dst demo: `dst demo --out` deletes this folder when run again\n")


def run(cfg: DemoConfig, console: Console | None = None) -> dict:
    console = console or Console()
    started = time.time()
    overrides = {
        "experiment": {"seeds": [cfg.seed]},
        "data": {"seed": cfg.seed},
        "grid": [{"variant": list(cfg.variant_list)}],
    }
    experiment = load(CONFIGS / f"{cfg.model}.toml", fast=cfg.fast, overrides=overrides)
    start_clean(cfg.out)
    lines = run_experiment(experiment, cfg.out / "experiment", console)
    summary = {}
    for line in lines:  # cells in grid order, then the baselines
        name = f"model-{line['grid']['variant']}" if line["seed"] is not None else line["grid"]["mode"]
        summary[name] = {c.summary: line["metrics"].get(f"test.mean.{c.path}") for c in summary_columns()}
    write_atomic(cfg.out / "summary.json", json.dumps(summary, indent=1))
    first = experiment.cells[0]
    shutil.copy(
        cfg.out / "experiment" / "cells" / first.slug / f"seed-{cfg.seed}" / "test" / "report.html",
        cfg.out / "report.html",
    )
    print_comparison(summary, console)
    console.print(
        f"demo done in {time.time() - started:.0f} s: {cfg.out / 'summary.json'}, {cfg.out / 'report.html'}",
        highlight=False,
    )
    return summary


def print_comparison(summary: dict, console: Console) -> None:
    table = Table(title="test split, mean over the two synthetic datasets")
    table.add_column("metric")
    for name in summary:
        table.add_column(name, justify="right")
    for c in summary_columns():
        table.add_row(
            c.summary, *("-" if summary[n][c.summary] is None else f"{summary[n][c.summary]:.3f}" for n in summary)
        )
    console.print(table)
