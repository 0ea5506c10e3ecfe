"""Where a run starts: a new folder, a checkpoint to continue from, or a run that died before its first checkpoint.

`--resume` continues from `RUN/checkpoints/last` when it exists and starts from step 0 when there is none yet, so
one command line serves every (re)start of a cluster job. What an earlier attempt logged is never lost: lines past
the resumed checkpoint and the metrics of an attempt that never checkpointed are moved to side files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.errors import InputError
from core.files import write_atomic

METRICS = "metrics.jsonl"


class RunFolderError(InputError):
    """The run folder is in a state `dst train` cannot safely continue from; the message says what to do."""


@dataclass(frozen=True)
class StartPoint:
    checkpoint: Path | None  # the step folder to continue from; None: start from step 0
    restart: bool = False  # an earlier attempt logged metrics but never saved a checkpoint


def start_point(out: Path, resume: bool) -> StartPoint:
    """Decide without changing anything (the inputs are checked before `set_aside` moves files)."""
    last = out / "checkpoints" / "last"
    has_last = last.is_symlink() or last.exists()
    if not resume:
        if (out / METRICS).exists() or has_last:
            raise RunFolderError(f"{out} already holds a run; pass --resume to continue it or pick another --out")
        return StartPoint(None)
    if has_last:
        folder = last.resolve()
        if not (folder / "trainer.json").is_file():
            raise RunFolderError(
                f"{last} points to {folder}, which is not a complete checkpoint; point it at a "
                "complete step-NNNNNN folder or remove it"
            )
        return StartPoint(folder)
    steps = sorted(p for p in (out / "checkpoints").glob("step-??????") if p.is_dir())
    if steps:
        raise RunFolderError(
            f"{out / 'checkpoints'} holds {steps[-1].name} but no 'last' link: link it "
            f"(ln -s {steps[-1].name} {last}) or move the checkpoints away"
        )
    return StartPoint(None, restart=(out / METRICS).exists())


def _free(path: Path) -> Path:
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.{n}")


def set_aside(out: Path, start: StartPoint, step: int) -> list[str]:
    """Main rank, once the inputs were accepted: keep the earlier attempt's logs out of the new run's
    metrics.jsonl. Returns what was done, for the console."""
    done = []
    metrics = out / METRICS
    if start.restart:
        aside = _free(out / f"{METRICS}.restart")
        metrics.replace(aside)
        done.append(f"no checkpoint yet: starting from step 0; the earlier attempt's metrics are in {aside.name}")
    elif start.checkpoint is not None and metrics.exists():
        kept, dropped = [], []
        for line in metrics.read_text().splitlines(keepends=True):
            try:
                past = json.loads(line)["step"] > step
            except (ValueError, KeyError, TypeError):  # a line cut short when the process was killed
                past = True
            (dropped if past else kept).append(line)
        if dropped:
            aside = _free(out / f"{METRICS}.after-step-{step}")
            aside.write_text("".join(dropped))
            write_atomic(metrics, "".join(kept))
            done.append(f"{len(dropped)} metrics lines logged after step {step} moved to {aside.name}")
    return done
