"""Where a command runs: its rank under torchrun and its device. Used by `dst prepare`, `dst train` and `dst eval`.

Under `torchrun --nproc-per-node N`, each process reads RANK / WORLD_SIZE / LOCAL_RANK from the environment and
takes GPU `cuda:{LOCAL_RANK}`; one process without torchrun is rank 0 of 1 and takes `cuda:0`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from core.errors import InputError

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "auto (a GPU when there is one, else cpu), cpu, cuda (the rank's GPU) or cuda:N"


class DeviceError(InputError):
    """A --device that cannot be used here."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        """torchrun's RANK / WORLD_SIZE / LOCAL_RANK (one process without them)."""
        return cls(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )

    @property
    def main(self) -> bool:
        return self.rank == 0


def choose_device(requested: str, ranks: Ranks) -> torch.device:
    """The device of this process for `--device requested`: `auto` and `cuda` give `cuda:{local rank}` (a device
    index is required by `torch.cuda.set_device`), `cuda:N` that GPU, `cpu` the CPU."""
    import torch  # here, not at the top: the CLI reads this module's help text at start-up

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise DeviceError(f"--device {requested!r} is not a device: use {DEVICE_HELP}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise DeviceError(f"--device {requested!r}: only cpu and cuda are supported ({DEVICE_HELP})")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {requested}: no CUDA GPU is visible to this process; use --device cpu")
    index = ranks.local_rank if device.index is None else device.index
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"--device {requested}: GPU {index} requested (local rank {ranks.local_rank}), but only {count} visible"
        )
    return torch.device("cuda", index)


@contextmanager
def process_group(ranks: Ranks, device: torch.device, backend: str = "gloo", timeout: timedelta = timedelta(days=1)):
    """Select the process's GPU and, with several ranks and no group yet, a process group for the run (destroyed
    at the end). `backend="auto"`: NCCL on GPUs (training's gradient all-reduce), gloo on CPUs; the commands that
    only exchange Python objects once per pass use gloo with a long timeout, since ranks finish minutes apart."""
    import torch

    if device.type == "cuda":
        torch.cuda.set_device(device)
    own = ranks.world > 1 and not torch.distributed.is_initialized()
    if own:
        chosen = ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend
        torch.distributed.init_process_group(chosen, timeout=timeout)
    try:
        yield
    finally:
        if own:
            torch.distributed.destroy_process_group()
