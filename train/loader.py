"""From shards to `Batch`es: collation, the per-epoch dataset for a DataLoader, and `TrainData` tying it together.

An epoch is fully determined by (seed, epoch): every rank computes the same sampled windows and packed batches and
takes its own equal-length share, so ranks never wait on each other and resuming at step s of an epoch is
`batches_for_epoch(epoch, start=s)`. Batches are built in DataLoader workers (`batch_size=None`: one item is one
ready batch), in index order, so the order does not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from pipeline.shard_index import ShardIndex
from train.batch import Batch
from train.losses import negative_keep_mask
from train.sequence import SequenceFormat, build_window
from train.windows import Window, cut_windows, epoch_windows, pack_batches, rank_batches


def stable_seed(*parts) -> int:
    """A 63-bit seed from values, the same in every process (Python's `hash` of a str is salted per process)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _pairs(row: int, positions: list[int]) -> list[tuple[int, int]]:
    return [(row, p) for p in positions]


def _index(pairs: list[tuple[int, int]]) -> torch.Tensor:
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def _weights(labels: list[int], rho: float, generator: torch.Generator) -> list[float]:
    """The loss weights of one window's decisions: train/losses.py's `negative_keep_mask` (the one rho rule); at
    rho 1 nothing is drawn, so the generator's later draws do not depend on it."""
    if rho >= 1.0:
        return [1.0] * len(labels)
    return negative_keep_mask(torch.tensor(labels, dtype=torch.float32), rho, generator).tolist()


def collate(index: ShardIndex, fmt: SequenceFormat, windows: list[Window], epoch_seed: int, rho: float = 1.0) -> Batch:
    """One padded batch of windows (right padding with the tokenizer's pad id, attention 0 there).

    Negative decisions are subsampled with probability `rho` of being kept, from a generator seeded by
    (epoch_seed, window), so the same window gets other draws in another epoch and the same draws on a rerun."""
    if not windows:
        raise ValueError("empty batch")
    seqs = [build_window(fmt, index.meta(w.video_id), w.conversation, w.start, w.end) for w in windows]
    for w, seq in zip(windows, seqs):
        if len(seq.input_ids) != w.n_tokens:
            raise ValueError(
                f"{w}: built {len(seq.input_ids)} tokens, cut for {w.n_tokens} "
                "(windows cut with another format or tokenizer?)"
            )
    n_rows, length = len(seqs), max(len(s.input_ids) for s in seqs)
    input_ids = torch.full((n_rows, length), fmt.pad_id, dtype=torch.long)
    attention = torch.zeros((n_rows, length), dtype=torch.long)
    image_mask = torch.zeros((n_rows, length), dtype=torch.bool)
    embeds: list[np.ndarray] = []
    upd_idx, upd_y, upd_w, spk_idx, spk_y, spk_w, dst_idx, resp_idx, sum_idx = [], [], [], [], [], [], [], [], []
    for b, (w, seq) in enumerate(zip(windows, seqs)):
        n = len(seq.input_ids)
        input_ids[b, :n] = torch.tensor(seq.input_ids, dtype=torch.long)
        attention[b, :n] = 1
        image_mask[b, seq.image_positions] = True
        # Frame blocks, hence `<image>` positions, come in row order, T per frame: rows flatten to position order.
        rows = index.rows(w.video_id, w.start, w.end)[np.asarray(seq.frame_rows) - w.start]
        embeds.append(rows.reshape(-1, rows.shape[-1]))
        g = torch.Generator().manual_seed(stable_seed(epoch_seed, w.video_id, w.conversation, w.start, w.end))
        upd_idx += _pairs(b, seq.update_positions)
        upd_y += seq.update_labels
        upd_w += _weights(seq.update_labels, rho, g)
        spk_idx += _pairs(b, seq.speak_positions)
        spk_y += seq.speak_labels
        spk_w += _weights(seq.speak_labels, rho, g)
        dst_idx += _pairs(b, seq.dst_targets)
        resp_idx += _pairs(b, seq.response_targets)
        sum_idx += _pairs(b, seq.summary_targets)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention,
        image_mask=image_mask,
        frame_embeds=torch.from_numpy(np.concatenate(embeds)),
        update_index=_index(upd_idx),
        update_labels=torch.tensor(upd_y, dtype=torch.float32),
        update_weights=torch.tensor(upd_w, dtype=torch.float32),
        speak_index=_index(spk_idx),
        speak_labels=torch.tensor(spk_y, dtype=torch.float32),
        speak_weights=torch.tensor(spk_w, dtype=torch.float32),
        dst_index=_index(dst_idx),
        response_index=_index(resp_idx),
        summary_index=_index(sum_idx),
    )


class EpochBatches(torch.utils.data.Dataset):
    """One epoch's batches for this rank, from step `start` on; item i is the collated batch `start + i`.

    Use with `DataLoader(ds, batch_size=None, shuffle=False, num_workers=N)`. Picklable for worker processes: the
    index reopens its shard files lazily in each process."""

    def __init__(
        self,
        index: ShardIndex,
        fmt: SequenceFormat,
        batches: list[list[Window]],
        epoch_seed: int,
        rho: float = 1.0,
        start: int = 0,
    ):
        if not 0 <= start <= len(batches):
            raise ValueError(f"start {start} outside the epoch's {len(batches)} batches")
        self.index, self.fmt, self.batches = index, fmt, batches
        self.epoch_seed, self.rho, self.start = epoch_seed, rho, start

    def __len__(self) -> int:
        return len(self.batches) - self.start

    def __getitem__(self, i: int) -> Batch:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return collate(self.index, self.fmt, self.batches[self.start + i], self.epoch_seed, self.rho)


class TrainData:
    """The data of one rank: windows cut once, then per epoch a weighted sample, token-budget batches and this
    rank's equal share.

    `positive_strength`, `dataset_weights` and `conversations_per_video`: see `windows.epoch_windows`; `rho`: the
    probability of keeping a negative decision in the loss (ProAssist found 0.1 essential; 1 keeps all).

    Every epoch has exactly `steps_per_epoch` batches per rank (epoch 0's count): another epoch's packing is cut
    to that length or topped up by repeating its first batches. The epoch is a sample with replacement anyway, so
    this costs nothing statistically and gives schedulers and checkpoint positions a fixed epoch length.

    `validation=True`: every window exactly once (no resampling, no cap, rho = 1), ranks take `batches[rank::world]`
    without truncation (their counts may differ by one: pool metrics once at the end, not per batch)."""

    def __init__(
        self,
        shards: str | Path | ShardIndex,
        fmt: SequenceFormat,
        max_seq_len: int,
        max_tokens: int,
        seed: int = 0,
        positive_strength: float = 1.0,
        dataset_weights: dict[str, float] | None = None,
        rho: float = 1.0,
        conversations_per_video: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        validation: bool = False,
    ):
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho must be in [0, 1], got {rho}")
        if max_tokens < 1 or max_seq_len < 1:
            raise ValueError(f"max_tokens and max_seq_len must be >= 1, got {max_tokens}, {max_seq_len}")
        self.index = shards if isinstance(shards, ShardIndex) else ShardIndex.build(shards)
        if self.index.tokens_per_frame != fmt.tokens_per_frame:
            raise ValueError(
                f"the shards hold {self.index.tokens_per_frame} tokens per frame, the sequence format "
                f"expects {fmt.tokens_per_frame}"
            )
        self.fmt, self.max_seq_len, self.max_tokens, self.seed = fmt, max_seq_len, max_tokens, seed
        self.positive_strength, self.dataset_weights = positive_strength, dataset_weights
        self.rho = 1.0 if validation else rho
        self.conversations_per_video, self.validation = conversations_per_video, validation
        self.rank, self.world_size = rank, world_size
        self.windows = [
            w for vid in self.index.video_ids for w in cut_windows(fmt, self.index.meta(vid), vid, max_seq_len)
        ]
        if validation:
            self.steps_per_epoch = len(self.all_batches(0)[rank::world_size])
        else:
            self.steps_per_epoch = len(self.all_batches(0)) // world_size
            if self.steps_per_epoch == 0:
                raise ValueError(f"{len(self.all_batches(0))} batches per epoch cannot feed {world_size} ranks")

    @classmethod
    def from_config(
        cls,
        shards: str | Path | ShardIndex,
        fmt: SequenceFormat,
        cfg,
        max_tokens: int,
        rank: int = 0,
        world_size: int = 1,
        validation: bool = False,
        max_seq_len: int | None = None,
    ) -> TrainData:
        """From a `TrainConfig` (max_seq_len unless given, seed, positive_strength, dataset_weights, rho,
        conversations_per_video)."""
        return cls(
            shards,
            fmt,
            max_seq_len or cfg.max_seq_len,
            max_tokens,
            cfg.seed,
            cfg.positive_strength,
            dict(cfg.dataset_weights) or None,
            cfg.rho,
            cfg.conversations_per_video,
            rank,
            world_size,
            validation,
        )

    def epoch_seed(self, epoch: int) -> int:
        return stable_seed("rho", self.seed, epoch)

    def all_batches(self, epoch: int) -> list[list[Window]]:
        """Every rank's batches of this epoch before fitting to the epoch length (the same list on every rank)."""
        if self.validation:
            sample = self.windows
        else:
            sample = epoch_windows(
                self.windows,
                epoch,
                self.seed,
                self.positive_strength,
                self.dataset_weights,
                self.conversations_per_video,
            )
        return pack_batches(sample, self.max_tokens, self.seed, epoch)

    def rank_batches(self, epoch: int, steps: int | None = None) -> list[list[Window]]:
        """This rank's batches of `epoch`: exactly `steps` (default `steps_per_epoch`) in training."""
        batches = self.all_batches(epoch)
        if self.validation:
            return batches[self.rank :: self.world_size]
        target = (steps or self.steps_per_epoch) * self.world_size
        batches = (batches * -(-target // len(batches)))[:target] if batches else []
        return rank_batches(batches, self.rank, self.world_size)

    def total_steps(self, epochs: int) -> int:
        return self.steps_per_epoch * epochs

    def batches_for_epoch(self, epoch: int, start: int = 0) -> EpochBatches:
        """This rank's batches of `epoch` from step `start` (to resume mid-epoch)."""
        return EpochBatches(self.index, self.fmt, self.rank_batches(epoch), self.epoch_seed(epoch), self.rho, start)


class Curriculum:
    """Easy before hard (`curriculum_steps`): the first epochs draw their batches from `easy` (the same videos cut
    into short windows, each opening with the state or summary of its start), the rest from `data`, the whole
    long windows. Epochs keep `data`'s length, so positions, checkpoints and resuming work as without it; the
    easy part covers `curriculum_steps` rounded up to whole epochs. Same interface as `TrainData` for the loop."""

    def __init__(self, easy: TrainData, data: TrainData, steps: int):
        self.easy, self.data = easy, data
        self.index, self.fmt, self.steps_per_epoch = data.index, data.fmt, data.steps_per_epoch
        self.easy_epochs = -(-steps // data.steps_per_epoch)

    def rank_batches(self, epoch: int) -> list[list[Window]]:
        if epoch < self.easy_epochs:
            return self.easy.rank_batches(epoch, self.steps_per_epoch)
        return self.data.rank_batches(epoch - self.easy_epochs)

    def batches_for_epoch(self, epoch: int, start: int = 0) -> EpochBatches:
        source = self.easy if epoch < self.easy_epochs else self.data
        return EpochBatches(self.index, self.fmt, self.rank_batches(epoch), source.epoch_seed(epoch), source.rho, start)
