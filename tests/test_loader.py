"""The training data pipeline on small shards from the tiny model: random access, windows, sampling, packing, rank
split, collation against the stored data and the labels, negative subsampling, and DataLoader workers."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline import shard_index
from pipeline.shard_index import ShardIndex
from pipeline.shards import ShardFormatError, encode_sample, npy_bytes, read_shard, write_shard
from pipeline.smolvlm import build_tiny_tokenizer
from train.batch import Batch
from train.loader import EpochBatches, TrainData, collate
from train.sequence import SequenceFormat, build_window
from train.windows import (
    Window,
    cut_windows,
    epoch_windows,
    pack_batches,
    padding_share,
    rank_batches,
)

SMALL = 200  # max_seq_len that splits every conversation into several windows


@pytest.fixture(scope="module")
def shards(tiny_shards) -> Path:
    assert len(list(tiny_shards.glob("shard-*.tar"))) > 1  # several shards: offsets across files
    return tiny_shards


@pytest.fixture(scope="module")
def fmt() -> SequenceFormat:
    return SequenceFormat(build_tiny_tokenizer(), 5)


@pytest.fixture(scope="module")
def index(shards) -> ShardIndex:
    return ShardIndex.build(shards)


@pytest.fixture(scope="module")
def stored(shards) -> dict:
    return {key: (emb, meta) for path in sorted(shards.glob("shard-*.tar")) for key, emb, meta in read_shard(path)}


@pytest.fixture(scope="module")
def windows(index, fmt) -> list[Window]:
    return [w for vid in index.video_ids for w in cut_windows(fmt, index.meta(vid), vid, SMALL)]


# ------------------------------------------------------------------------------------------------ shard index


def test_index_rows_and_meta_equal_read_shard(index, stored, monkeypatch):
    monkeypatch.setattr(shard_index, "OPEN_SHARDS", 2)  # 4 shards: maps get closed and reopened
    assert index.video_ids == list(stored) and (index.tokens_per_frame, index.hidden_size) == (5, 64)
    rng = np.random.default_rng(0)
    reopened = pickle.loads(pickle.dumps(index))  # as a worker gets it: files reopened lazily
    for key, (emb, meta) in stored.items():
        assert index.meta(key) == meta and index.num_rows(key) == len(emb)
        assert np.array_equal(index.rows(key, 0, len(emb)), emb)
        for _ in range(5):
            a = int(rng.integers(0, len(emb)))
            b = int(rng.integers(a, len(emb) + 1))
            rows = reopened.rows(key, a, b)
            assert rows.dtype == np.float16 and rows.shape == (b - a, 5, 64) and np.array_equal(rows, emb[a:b])
    assert len(reopened._maps) == 2
    with pytest.raises(IndexError):
        index.rows(key, 0, len(emb) + 1)
    with pytest.raises(KeyError, match="not in the shards"):
        index.meta("wtag__nope")


def _bad_shard(folder: Path, name: str, samples: list[dict]) -> Path:
    folder.mkdir()
    write_shard(folder / name, samples)  # bypasses encode_sample's checks
    return folder


def test_index_errors_name_shard_and_key(tmp_path, stored):
    (key, (emb, meta)), (key2, (emb2, meta2)) = list(stored.items())[:2]
    good = encode_sample(key, emb, meta)
    as_f32 = {**good, "emb.npy": npy_bytes(emb.astype(np.float32))}
    with pytest.raises(ShardFormatError, match=rf"shard-000007.tar: sample {key}: .*float16"):
        ShardIndex.build(_bad_shard(tmp_path / "a", "shard-000007.tar", [as_f32]))
    short = {**good, "emb.npy": npy_bytes(emb[:-1])}
    with pytest.raises(ShardFormatError, match=rf"shard-000000.tar: sample {key}: {len(emb) - 1} embedding rows"):
        ShardIndex.build(_bad_shard(tmp_path / "b", "shard-000000.tar", [short]))
    with pytest.raises(ShardFormatError, match=rf"sample {key} has members \['json'\]"):
        ShardIndex.build(_bad_shard(tmp_path / "c", "shard-000000.tar", [{"__key__": key, "json": good["json"]}]))
    other = encode_sample(key2, np.ascontiguousarray(emb2[:, :1]), meta2)  # 1 token per frame beside 5
    with pytest.raises(ShardFormatError, match="disagree"):
        ShardIndex.build(_bad_shard(tmp_path / "d", "shard-000000.tar", [good, other]))
    with pytest.raises(ShardFormatError, match="does not exist"):
        ShardIndex.build(tmp_path / "d" / "nothing")


# ------------------------------------------------------------------------------------------------ windows


@pytest.mark.parametrize("max_seq_len", [SMALL, 260, 4096])
def test_windows_exact_lengths_and_cover(index, fmt, max_seq_len):
    for vid in index.video_ids:
        meta = index.meta(vid)
        ws = cut_windows(fmt, meta, vid, max_seq_len)
        for c, conv in enumerate(meta.conversations):
            mine = [w for w in ws if w.conversation == c]
            assert [w.start for w in mine] == [0] + [w.end for w in mine[:-1]]  # contiguous, no overlap
            assert mine[-1].end == index.num_rows(vid) and all(w.end > w.start for w in mine)
            if max_seq_len == SMALL:
                assert len(mine) >= 3
            for w in mine:
                seq = build_window(fmt, meta, c, w.start, w.end)
                assert len(seq.input_ids) == w.n_tokens <= max_seq_len
                assert w.n_update_pos == sum(meta.dst_update[w.start : w.end]) == sum(seq.update_labels)
                assert w.n_speak_pos == sum(conv.speak[w.start : w.end]) == sum(seq.speak_labels)
                assert (w.video_id, w.dataset) == (vid, meta.dataset)


def test_frame_that_cannot_fit_raises(index, fmt):
    vid = index.video_ids[0]
    meta = index.meta(vid)
    alone = [len(build_window(fmt, meta, c, r, r + 1).input_ids) for c in range(2) for r in range(index.num_rows(vid))]
    assert all(w.n_tokens <= max(alone) for w in cut_windows(fmt, meta, vid, max(alone)))  # every frame fits
    system_and_frame = alone[0]
    with pytest.raises(ValueError, match=rf"video {vid}, conversation 0: frame row 0 needs {system_and_frame}"):
        cut_windows(fmt, meta, vid, system_and_frame - 1)


# ------------------------------------------------------------------------------------------------ sampling


def _synthetic(n: int = 2000) -> list[Window]:
    """Half the windows without positives, half with 3; datasets alternate; 4 conversations per video."""
    return [
        Window(f"v{i // 8}", "a" if i % 2 else "b", (i // 2) % 4, i, i + 1, 100 + i % 50, 3 * (i % 4 >= 2), 0)
        for i in range(n)
    ]


def _positive_share(sample: list[Window]) -> float:
    return sum(w.n_positives > 0 for w in sample) / len(sample)


def test_sampling_weights_positives_and_datasets():
    ws = _synthetic()
    uniform = epoch_windows(ws, epoch=0, seed=1, positive_strength=0.0)
    assert len(uniform) == len(ws) and uniform == epoch_windows(ws, epoch=0, seed=1, positive_strength=0.0)
    assert uniform != epoch_windows(ws, epoch=1, seed=1, positive_strength=0.0)
    strong = epoch_windows(ws, epoch=0, seed=1, positive_strength=1.0)  # weight 4 vs 1: expect 0.8
    assert abs(_positive_share(uniform) - 0.5) < 0.05 and abs(_positive_share(strong) - 0.8) < 0.05
    assert (
        _positive_share(uniform)
        < _positive_share(strong)
        < _positive_share(epoch_windows(ws, epoch=0, seed=1, positive_strength=2.0))
    )
    counts = Counter(w.dataset for w in epoch_windows(ws, 0, 1, 0.0, dataset_weights={"a": 3.0}))
    assert abs(counts["a"] / len(ws) - 0.75) < 0.05  # b defaults to 1
    assert Counter(w.dataset for w in epoch_windows(ws, 0, 1, 1.0, dataset_weights={"b": 0.0})) == {"a": len(ws)}


def test_conversation_cap_per_video():
    ws = _synthetic()
    picks = []
    for epoch in range(3):
        sample = epoch_windows(ws, epoch, seed=1, conversations_per_video=2)
        per_video = {v: {w.conversation for w in sample if w.video_id == v} for v in {w.video_id for w in sample}}
        assert max(len(c) for c in per_video.values()) <= 2 and len(sample) == len(ws) // 2
        picks.append(per_video)
    assert picks[0] != picks[1]


# ------------------------------------------------------------------------------------------------ packing, ranks


def test_packing_budget_and_padding(windows):
    ws = _synthetic()
    batches = pack_batches(ws, max_tokens=2000, seed=0, epoch=0)
    assert sorted(w.start for b in batches for w in b) == sorted(w.start for w in ws)  # every window once
    assert all(len(b) * max(w.n_tokens for w in b) <= 2000 for b in batches)
    assert batches == pack_batches(ws, 2000, 0, 0) and batches != pack_batches(ws, 2000, 0, 1)
    long = [Window("x", "a", 0, 0, 1, 5000, 0, 0)]
    mixed = pack_batches(ws[:50] + long, max_tokens=2000, seed=0, epoch=0)
    assert [w for b in mixed for w in b if w.n_tokens > 2000] == long and [long[0]] in mixed
    synthetic_share = padding_share(batches)
    sample = epoch_windows(windows, 0, seed=0)
    test_share = padding_share(pack_batches(sample, max_tokens=4 * SMALL, seed=0, epoch=0))
    print(
        f"padding share: {test_share:.1%} (test shards, {len(sample)} windows, budget {4 * SMALL}), "
        f"{synthetic_share:.1%} (2000 windows of 100-149 tokens, budget 2000)"
    )
    assert test_share < 0.10 and synthetic_share < 0.10


def test_rank_split_equal_and_disjoint():
    batches = pack_batches(_synthetic(), max_tokens=1000, seed=0, epoch=0)
    assert any(len(batches) % world for world in (2, 3))  # at least one split truncates
    for world in (2, 3):
        parts = [[id(b) for b in rank_batches(batches, r, world)] for r in range(world)]
        assert {len(p) for p in parts} == {len(batches) // world}
        assert len(set().union(*parts)) == sum(map(len, parts)) and set().union(*parts) <= set(map(id, batches))
    with pytest.raises(ValueError):
        rank_batches(batches, 2, 2)


# ------------------------------------------------------------------------------------------------ collate


def test_collate_matches_stored_data_and_labels(index, fmt, stored, windows):
    picked = [windows[0], windows[5], windows[-1], windows[len(windows) // 2]]
    assert len({w.n_tokens for w in picked}) > 1  # real padding
    batch = collate(index, fmt, picked, epoch_seed=0)
    fake, eos = fmt.frame[-1], fmt.eos_id
    assert fmt.pad_id != eos and batch.num_tokens == sum(w.n_tokens for w in picked)
    assert int(batch.image_mask.sum()) == batch.frame_embeds.shape[0] == 5 * sum(w.end - w.start for w in picked)
    assert batch.frame_embeds.dtype == torch.float16
    offset = 0
    for b, w in enumerate(picked):
        emb, meta = stored[w.video_id]
        ids = batch.input_ids[b]
        assert batch.attention_mask[b, : w.n_tokens].all() and not batch.attention_mask[b, w.n_tokens :].any()
        assert (ids[w.n_tokens :] == fmt.pad_id).all() and not batch.image_mask[b, w.n_tokens :].any()
        assert (ids[batch.image_mask[b]] == fmt.image_id).all()
        n = 5 * (w.end - w.start)
        assert torch.equal(
            batch.frame_embeds[offset : offset + n], torch.from_numpy(emb[w.start : w.end].reshape(-1, 64))
        )
        offset += n

        conv = meta.conversations[w.conversation]
        upd = batch.update_index[:, 0] == b
        spk = batch.speak_index[:, 0] == b
        assert batch.update_labels[upd].tolist() == [float(x) for x in meta.dst_update[w.start : w.end]]
        assert batch.speak_labels[spk].tolist() == [float(x) for x in conv.speak[w.start : w.end]]
        assert (ids[batch.update_index[upd, 1]] == fake).all()
        speak_ids = ids[batch.speak_index[spk, 1]]
        updated = batch.update_labels[upd].bool()
        assert (speak_ids[updated] == eos).all() and (speak_ids[~updated] == fake).all()

        dst_ids = ids[batch.dst_index[batch.dst_index[:, 0] == b, 1]].tolist()
        response_ids = ids[batch.response_index[batch.response_index[:, 0] == b, 1]].tolist()
        deltas = [json.loads(d) for d in meta.dst_delta[w.start : w.end] if d]
        responses = [r for r in conv.response[w.start : w.end] if r]
        assert dst_ids == [t for d in deltas for t in fmt.dst_body(d)]
        assert response_ids == [t for r in responses for t in fmt.response_body(r)]
        assert dst_ids.count(eos) == w.n_update_pos and response_ids.count(eos) == w.n_speak_pos
        assert (not dst_ids or dst_ids[-1] == eos) and (not response_ids or response_ids[-1] == eos)
    assert offset == batch.frame_embeds.shape[0]
    assert len(batch.dst_index) and len(batch.response_index)  # the picked windows have text targets


def test_rho_subsamples_negatives_per_epoch(index, fmt, windows):
    keep_all = collate(index, fmt, windows, epoch_seed=3, rho=1.0)
    assert (keep_all.update_weights == 1).all() and (keep_all.speak_weights == 1).all()
    a = collate(index, fmt, windows, epoch_seed=3, rho=0.3)
    again = collate(index, fmt, windows, epoch_seed=3, rho=0.3)
    other = collate(index, fmt, windows, epoch_seed=4, rho=0.3)
    for field in ("update", "speak"):
        labels, weights = getattr(a, f"{field}_labels"), getattr(a, f"{field}_weights")
        assert (weights[labels == 1] == 1).all() and set(weights.tolist()) == {0.0, 1.0}
        assert torch.equal(weights, getattr(again, f"{field}_weights"))
        assert not torch.equal(weights, getattr(other, f"{field}_weights"))
        assert 0.15 < weights[labels == 0].mean().item() < 0.45, weights[labels == 0].mean()
    # The draw belongs to the window, not to its place in a batch.
    alone = collate(index, fmt, windows[3:4], epoch_seed=3, rho=0.3)
    assert torch.equal(alone.update_weights, a.update_weights[a.update_index[:, 0] == 3])


# ------------------------------------------------------------------------------------------------ TrainData


def _same(x: Batch, y: Batch) -> bool:
    return all(torch.equal(getattr(x, f), getattr(y, f)) for f in Batch.__dataclass_fields__)


def test_train_data_ranks_and_workers(shards, fmt):
    kwargs = dict(max_seq_len=SMALL, max_tokens=3 * SMALL, seed=5, rho=0.5, dataset_weights={"ego4d": 2.0})
    ranks = [TrainData(shards, fmt, rank=r, world_size=2, **kwargs) for r in range(2)]
    steps = ranks[0].steps_per_epoch
    assert steps == ranks[1].steps_per_epoch == len(ranks[0].all_batches(0)) // 2 > 2
    for epoch in range(4):  # a fixed epoch length, equal on both ranks, disjoint shares
        mine, theirs = ranks[0].rank_batches(epoch), ranks[1].rank_batches(epoch)
        assert len(mine) == len(theirs) == steps and not {id(b) for b in mine} & {id(b) for b in theirs}
    assert ranks[0].rank_batches(1) == (ranks[0].all_batches(1) * 3)[: 2 * steps][0::2]  # cut or topped up

    ds = ranks[0].batches_for_epoch(1)
    serial = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0))
    parallel = list(
        torch.utils.data.DataLoader(pickle.loads(pickle.dumps(ds)), batch_size=None, num_workers=2, shuffle=False)
    )
    assert len(serial) == len(parallel) == len(ds) == steps
    assert all(_same(x, y) for x, y in zip(serial, parallel))
    resumed = ranks[0].batches_for_epoch(1, start=2)
    assert isinstance(resumed, EpochBatches) and len(resumed) == len(ds) - 2
    assert _same(resumed[0], serial[2])
    with pytest.raises(ValueError, match="tokens per frame"):
        TrainData(shards, SequenceFormat(build_tiny_tokenizer(), 1), **kwargs)


def test_validation_data_every_window_once(shards, index, fmt):
    cfg = SimpleNamespace(
        max_seq_len=SMALL, seed=1, positive_strength=1.0, dataset_weights={}, rho=0.1, conversations_per_video=1
    )
    ranks = [TrainData.from_config(index, fmt, cfg, 3 * SMALL, r, 2, validation=True) for r in range(2)]
    seen = [w for data in ranks for b in data.rank_batches(0) for w in b]
    assert sorted(seen, key=repr) == sorted(ranks[0].windows, key=repr)  # each window once, no cap, no truncation
    batch = ranks[1].batches_for_epoch(0)[0]
    assert (batch.update_weights == 1).all() and (batch.speak_weights == 1).all()  # rho ignored
