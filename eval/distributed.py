"""Multi-process `dst eval` (`torchrun --nproc-per-node N --no-python dst eval ...`).

Each rank streams its share of the dialogues; rank 0 gathers the records, puts them back in the single-process
order (video order of the shards, then conversation) and scores and writes everything, so `predictions.jsonl` is
the file one process writes. Shares are balanced by length (streamed frames): longest dialogue first, each to the
least loaded rank. The ranks only exchange Python objects, once per pass, so the group is gloo (CPU) whatever the
device, with a long timeout: ranks finish their shares minutes apart.
"""

from __future__ import annotations

import torch

from core.runtime import Ranks


def balanced_shares(lengths: list[int], world: int) -> list[list[int]]:
    """Indices of `lengths` per rank (each share in index order): longest first to the least loaded rank (ties to
    the lower index and the lower rank), so the shares are deterministic and within one longest item of each
    other."""
    loads, shares = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        shares[rank].append(i)
        loads[rank] += lengths[i]
    return [sorted(share) for share in shares]


def gather_to_main(obj, ranks: Ranks) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0; None elsewhere."""
    if ranks.world == 1:
        return [obj]
    out = [None] * ranks.world if ranks.main else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj, ranks: Ranks):
    """Rank 0's `obj` on every rank."""
    if ranks.world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
