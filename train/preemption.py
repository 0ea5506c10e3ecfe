"""SIGTERM: what SLURM (`--signal=TERM@300`) or a preempting scheduler sends to every process of the job.

The main process turns it into a flag (`Preemption`), checked once per step: the loop saves a checkpoint, writes
`RUN/preempted.json` and returns, and `dst train` exits 0. The job script requeues itself when that file exists
(see the README's SLURM recipe). DataLoader workers get the signal too (it goes to the whole process group): they
ignore it, so they keep serving batches until the main process has saved and shuts them down; torch's own worker
handler would kill them and make the main process fail before it could save.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import torch

from core.files import write_atomic

PREEMPTED = "preempted.json"


class Preemption:
    """Install at the very start of a run, so that a signal during set-up also ends it cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def requested_anywhere(self, runtime) -> bool:
        """Under DDP every rank must stop at the same step, even if only one got the signal."""
        if runtime.world == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=runtime.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def ignore_sigterm_in_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the main process handles SIGTERM; workers started with it blocked (see
    `sigterm_blocked`) now ignore it, which also drops one that arrived while they started."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


@contextlib.contextmanager
def sigterm_blocked():
    """Start DataLoader workers with SIGTERM blocked, so none can die of it before `ignore_sigterm_in_worker` runs;
    a signal that arrives meanwhile reaches the main process's handler when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def write_marker(run: Path, step: int, checkpoint: Path | None) -> None:
    """`RUN/preempted.json`: the run stopped on a signal after saving everything; `--resume` continues it."""
    write_atomic(
        run / PREEMPTED,
        json.dumps(
            {
                "step": step,
                "checkpoint": str(checkpoint) if checkpoint else None,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        ),
    )
