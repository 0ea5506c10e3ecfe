"""Windows: cutting videos into sequences that fit, sampling an epoch, packing batches by token budget, and
splitting batches over DDP ranks.

Every function here is deterministic in its arguments (seed, epoch), so every rank computes the same epoch and the
same batches, and a resumed run recomputes exactly the batches it had.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from pipeline.shards import VideoMeta
from train.sequence import (
    SequenceFormat,
    closing_cost,
    frame_cost,
    frame_segments,
    system_for,
)

BUCKET = 100  # windows per shuffled bucket when packing: large enough for little padding, small enough to mix


@dataclass(frozen=True)
class Window:
    """Frame rows [start, end) of one video for one conversation; rows are relative to the stream's first frame."""

    video_id: str
    dataset: str
    conversation: int
    start: int
    end: int
    n_tokens: int  # exactly len(build_window(...).input_ids)
    n_update_pos: int  # frames in the window with a DST update
    n_speak_pos: int  # frames in the window where the assistant speaks

    @property
    def n_positives(self) -> int:
        return self.n_update_pos + self.n_speak_pos


# ------------------------------------------------------------------------------------------------------ cutting


def cut_windows(fmt: SequenceFormat, meta: VideoMeta, video_id: str, max_seq_len: int) -> list[Window]:
    """Greedy windows for every conversation of one video: contiguous, non-overlapping, covering every row, each at
    most `max_seq_len` tokens. A window's cost is its own system segment (which depends on its start: the state and
    recent turns there), its frames' costs and, for the summary variant, the block that closes a window stopping
    before the video's end, all from sequence.py, so `n_tokens` equals the built length."""
    n_rows = meta.num_rows
    windows = []
    for c, conv in enumerate(meta.conversations):
        cuts = []  # (start, end, n_tokens)
        start, used = 0, len(system_for(fmt, meta, c, 0))
        for row in range(n_rows):
            cost = frame_cost(fmt, frame_segments(fmt, meta, c, row))
            # A window that takes this frame must still fit the block that closes it after this frame; the window
            # before it always fits its own closing block (checked when its last frame was taken).
            if used + cost + closing_cost(fmt, meta, c, row + 1) > max_seq_len and row > start:
                cuts.append((start, row, used + closing_cost(fmt, meta, c, row)))
                start, used = row, len(system_for(fmt, meta, c, row))
            if used + cost + closing_cost(fmt, meta, c, row + 1) > max_seq_len:
                raise ValueError(
                    f"video {video_id}, conversation {c}: frame row {row} needs "
                    f"{used + cost + closing_cost(fmt, meta, c, row + 1)} tokens with its system prompt"
                    f"{' and closing summary' if fmt.variant.writes_summary else ''}, more than "
                    f"max_seq_len={max_seq_len}"
                )
            used += cost
        if n_rows:
            cuts.append((start, n_rows, used))
        windows += [
            Window(
                video_id,
                meta.dataset,
                c,
                a,
                b,
                n,
                sum(map(bool, meta.dst_update[a:b])) if fmt.variant.tracks_state else 0,
                sum(map(bool, conv.speak[a:b])),
            )
            for a, b, n in cuts
        ]
    return windows


# ------------------------------------------------------------------------------------------------------ sampling


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    """Independent generators per (seed, epoch, purpose)."""
    return np.random.default_rng([seed, epoch, stream])


def epoch_weights(
    windows: list[Window], positive_strength: float = 1.0, dataset_weights: dict[str, float] | None = None
) -> np.ndarray:
    """Unnormalised sampling weight per window:

        w = dataset_weights.get(dataset, 1.0) * (1 + n_update_pos + n_speak_pos) ** positive_strength

    strength 0 is uniform (over datasets with equal weight); 1 makes a window with 3 positives 4x as likely as one
    without. The dataset weight multiplies each window, so a dataset's share is weight x its window mass."""
    dataset_weights = dataset_weights or {}
    if any(w < 0 for w in dataset_weights.values()):
        raise ValueError(f"dataset weights must be >= 0, got {dataset_weights}")
    base = np.array([dataset_weights.get(w.dataset, 1.0) for w in windows], dtype=np.float64)
    positives = np.array([w.n_positives for w in windows], dtype=np.float64)
    return base * (1.0 + positives) ** positive_strength


def epoch_windows(
    windows: list[Window],
    epoch: int,
    seed: int,
    positive_strength: float = 1.0,
    dataset_weights: dict[str, float] | None = None,
    conversations_per_video: int | None = None,
) -> list[Window]:
    """The windows of one epoch: drawn with replacement, as many as the pool holds, with probability proportional to
    `epoch_weights` (see there). With `conversations_per_video` = N, the pool first keeps, per video, the windows of
    at most N conversations picked at random this epoch (so the epoch shrinks accordingly): conversations of one
    video share its frames, and the cap stops long, talkative videos from dominating."""
    rng = _rng(seed, epoch, 0)
    pool = windows
    if conversations_per_video is not None:
        if conversations_per_video < 1:
            raise ValueError(f"conversations_per_video must be >= 1, got {conversations_per_video}")
        convs: dict[str, list[int]] = defaultdict(list)
        for w in windows:
            if w.conversation not in convs[w.video_id]:
                convs[w.video_id].append(w.conversation)
        keep = set()
        for video in sorted(convs):  # sorted: the draw must not depend on the order windows came in
            picked = rng.permutation(sorted(convs[video]))[:conversations_per_video]
            keep.update((video, int(c)) for c in picked)
        pool = [w for w in windows if (w.video_id, w.conversation) in keep]
    if not pool:
        return []
    weights = epoch_weights(pool, positive_strength, dataset_weights)
    if weights.sum() <= 0:
        raise ValueError("every window has sampling weight 0 (check dataset_weights)")
    picks = rng.choice(len(pool), size=len(pool), replace=True, p=weights / weights.sum())
    return [pool[i] for i in picks]


# ------------------------------------------------------------------------------------------------------ batching


def pack_batches(
    windows: list[Window], max_tokens: int, seed: int, epoch: int, bucket: int = BUCKET
) -> list[list[Window]]:
    """Batches with `len(batch) * longest <= max_tokens` and little padding: shuffle, cut into buckets of `bucket`
    windows, sort each bucket by length and fill batches greedily, then shuffle the batch order. Only a window
    longer than `max_tokens` breaks the budget, alone in its batch."""
    rng = _rng(seed, epoch, 1)
    order = [windows[i] for i in rng.permutation(len(windows))]
    batches: list[list[Window]] = []
    for lo in range(0, len(order), bucket):
        current: list[Window] = []
        longest = 0
        for w in sorted(order[lo : lo + bucket], key=lambda w: w.n_tokens):
            if current and (len(current) + 1) * max(longest, w.n_tokens) > max_tokens:
                batches.append(current)
                current, longest = [], 0
            current.append(w)
            longest = max(longest, w.n_tokens)
        if current:
            batches.append(current)
    return [batches[i] for i in rng.permutation(len(batches))]


def padding_share(batches: list[list[Window]]) -> float:
    """Pad tokens / all tokens of the padded batches."""
    padded = sum(len(b) * max(w.n_tokens for w in b) for b in batches)
    real = sum(w.n_tokens for b in batches for w in b)
    return (padded - real) / padded if padded else 0.0


def rank_batches(batches: list[list[Window]], rank: int, world_size: int) -> list[list[Window]]:
    """This rank's batches: every `world_size`-th, truncated so every rank gets exactly len // world_size (DDP ranks
    must run the same number of steps, or the last all-reduce waits forever)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return batches[rank::world_size][: len(batches) // world_size]
