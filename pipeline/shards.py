"""WebDataset shards: one sample per video with exactly two members, `emb.npy` and `json`.

`emb.npy` is float16 `[n_stream_frames, tokens_per_frame, hidden]` with row 0 = frame `k0` (never absolute frame
numbers: an earlier attempt indexed per-clip features with absolute frames). `json` holds the video's metadata, DST
nodes, conversations and per-point labels. Shards are written deterministically (fixed member order, mtime, owner)
so that rerunning the same command reproduces them byte for byte.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds

from pipeline.labels import label_columns, state_json
from pipeline.timeline import VideoLabels

EMB, META = "emb.npy", "json"
SHARD_PATTERN = "shard-{:06d}.tar"


def sample_key(dataset: str, video_uid: str) -> str:
    """A tar-safe, unique key: WebDataset splits member names at the first dot, so keys carry no dots."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{dataset}__{video_uid}")


def sample_meta(labels: VideoLabels, model: str, tokens_per_frame: int | str) -> dict:
    """Everything training and eval need besides the embeddings. Per-point lists start at frame k0, like the rows
    of `emb.npy` and the rows `dst labels` writes."""
    rec = labels.record
    cols = label_columns(labels)
    n = len(labels.points)
    return {
        "video_uid": rec.video_uid,
        "dataset": rec.dataset,
        "fps": labels.fps,
        "first_frame": labels.k0,
        "num_frames": labels.n_frames,
        "tokens_per_frame": tokens_per_frame,
        "model": model,
        "goal": rec.goal,
        "knowledge": rec.knowledge,
        "nodes": [{"id": x.id, "name": x.name, "start_ts": x.start_ts, "end_ts": x.end_ts} for x in rec.nodes],
        "initial_state": json.loads(state_json(labels.dst.initial)),
        "conversations": [
            {"user_type": c.user_type,
             "turns": [{"role": t.role, "time": t.time, "content": t.content} for t in c.turns]}
            for c in rec.conversations
        ],
        "labels": {
            "frame": cols["frame"][:n],
            "time": cols["time"][:n],
            "dst_update": cols["dst_update"][:n],
            "dst_delta": cols["dst_delta"][:n],
            "dst_state": cols["dst_state"][:n],
            "conversations": [
                {"conversation": c.index, "user_type": c.user_type,
                 "user_text": cols["user_text"][i * n:(i + 1) * n],
                 "speak": cols["speak"][i * n:(i + 1) * n],
                 "response": cols["response"][i * n:(i + 1) * n],
                 "progress": cols["progress"][i * n:(i + 1) * n],
                 "response_labels": [c.response_labels.get(k, "") for k in labels.points]}
                for i, c in enumerate(labels.conversations)
            ],
        },
    }


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_sample(key: str, emb: np.ndarray, meta: dict) -> dict:
    if emb.dtype != np.float16 or emb.ndim != 3:
        raise ValueError(f"{key}: embeddings must be float16 [frames, tokens, hidden], got {emb.dtype} {emb.shape}")
    n = len(meta["labels"]["frame"])
    if emb.shape[0] != n:
        raise ValueError(f"{key}: {emb.shape[0]} embedding rows for {n} decision points")
    return {"__key__": key, EMB: npy_bytes(emb), META: json.dumps(meta, ensure_ascii=False).encode("utf-8")}


def write_shard(path: Path, samples: Iterable[dict]) -> None:
    """Write encoded samples to `path` under a temporary name, then rename: a shard on disk is always complete."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0.0, user="dst", group="dst", mode=0o444)
            for sample in samples:
                writer.write(sample)
            writer.close()
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_shard(path: str | Path) -> Iterator[tuple[str, np.ndarray, dict]]:
    """(key, embeddings, meta) for every sample of a shard, in order, reading the whole shard (tests and tools;
    training reads rows by offset through train/shard_index.py)."""
    with tarfile.open(path) as tar:
        members: dict[str, dict[str, bytes]] = {}
        order: list[str] = []
        for member in tar:
            key, _, suffix = member.name.partition(".")
            if key not in members:
                members[key] = {}
                order.append(key)
            members[key][suffix] = tar.extractfile(member).read()
    for key in order:
        parts = members[key]
        if set(parts) != {EMB, META}:
            raise ValueError(f"{path}: sample {key} has members {sorted(parts)}, expected {[EMB, META]}")
        emb = np.load(io.BytesIO(parts[EMB]), allow_pickle=False)
        yield key, emb, json.loads(parts[META])


def plan_shards(sizes: list[tuple[str, int]], shard_bytes: int) -> list[list[str]]:
    """Greedy, order-preserving packing of (key, bytes) into shards of at most `shard_bytes` (a video larger than
    that gets a shard of its own). Deterministic, so every rank and every rerun computes the same plan."""
    shards: list[list[str]] = []
    current, used = [], 0
    for key, size in sizes:
        if current and used + size > shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(key)
        used += size
    if current:
        shards.append(current)
    return shards
