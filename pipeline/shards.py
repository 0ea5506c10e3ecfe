"""WebDataset shards: one sample per video with exactly two members, `emb.npy` and `json`.

`emb.npy` is float16 `[n_stream_frames, tokens_per_frame, hidden]` with row 0 = frame `k0` (never absolute frame
numbers: an earlier attempt indexed per-clip features with absolute frames). `json` holds the video's metadata, DST
nodes, conversations and per-point labels. Shards are written deterministically (fixed member order, mtime, owner)
so that rerunning the same command reproduces them byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds

from pipeline.labels import label_columns, state_json
from pipeline.shard_meta import ShardFormatError, validate_meta
from pipeline.timeline import VideoLabels

EMB, META = "emb.npy", "json"
SHARD_PATTERN = "shard-{:06d}.tar"
MANIFEST = "manifest.json"
KEY_TEXT = 80  # characters of readable text in a key; the hash keeps longer uids apart


def sample_key(dataset: str, video_uid: str) -> str:
    """A tar-safe key, unique by construction: the readable `{dataset}__{video_uid}` with every character outside
    [A-Za-z0-9_-] replaced by `_` (WebDataset splits member names at the first dot) and cut to KEY_TEXT characters,
    plus a hash of the exact (dataset, video_uid), so `a.b` and `a_b` (or two non-ASCII uids) get different keys.
    Readers treat keys as opaque strings: shards written with older keys load as they are."""
    text = re.sub(r"[^A-Za-z0-9_-]", "_", f"{dataset}__{video_uid}")[:KEY_TEXT]
    exact = f"{dataset}\0{video_uid}".encode("utf-8", "surrogatepass")
    return f"{text}-{hashlib.blake2b(exact, digest_size=6).hexdigest()}"


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
    training reads rows by offset through train/shard_index.py). A shard that is not what `dst prepare` writes
    raises `ShardFormatError` naming the file and the sample."""
    members: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                key, _, suffix = member.name.partition(".")
                if not member.isfile() or suffix not in (EMB, META):
                    raise ShardFormatError(f"{path}: unexpected member {member.name!r}")
                if key not in members:
                    members[key] = {}
                    order.append(key)
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise ShardFormatError(f"{path}: sample {key}: {suffix} is cut short (truncated file)")
                members[key][suffix] = data
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardFormatError(f"{path}: not a readable tar ({exc})") from None
    for key in order:
        where = f"{path}: sample {key}"
        parts = members[key]
        if set(parts) != {EMB, META}:
            raise ShardFormatError(f"{where} has members {sorted(parts)}, expected {[EMB, META]}")
        try:
            emb = np.load(io.BytesIO(parts[EMB]), allow_pickle=False)
        except (ValueError, EOFError, OSError) as exc:
            raise ShardFormatError(f"{where}: unreadable {EMB}: {exc}") from None
        if emb.dtype != np.float16 or emb.ndim != 3:
            raise ShardFormatError(f"{where}: {EMB} must be float16 [frames, tokens, hidden], got {emb.dtype} "
                                   f"{list(emb.shape)}")
        meta = validate_meta(parse_meta(parts[META], where), where)
        if len(meta["labels"]["frame"]) != emb.shape[0]:
            raise ShardFormatError(f"{where}: {emb.shape[0]} embedding rows for {len(meta['labels']['frame'])} "
                                   "label points")
        yield key, emb, meta


def parse_meta(data: bytes, where: str) -> object:
    """The `json` member's value; `ShardFormatError` when it is not JSON."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ShardFormatError(f"{where}: unreadable {META}: {str(exc).splitlines()[0] if str(exc) else exc!r}") \
            from None


def expected_samples(shard_dir: Path) -> tuple[dict[str, int] | None, str | None]:
    """(samples per shard file name, None) from the folder's manifest.json, or (None, a warning) for shard folders
    written before manifests counted them (or copied without their manifest): truncation at a sample boundary
    cannot be detected there."""
    path = shard_dir / MANIFEST
    if not path.is_file():
        return None, f"{shard_dir} has no {MANIFEST}: cannot check that every shard holds all its samples"
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise ShardFormatError(f"{path}: unreadable ({exc})") from None
    counts = manifest.get("shard_samples") if isinstance(manifest, dict) else None
    if counts is None:
        return None, (f"{path} has no per-shard sample counts (written by an older dst prepare): cannot check that "
                      "every shard holds all its samples")
    if not isinstance(counts, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                               for v in counts.values()):
        raise ShardFormatError(f"{path}: 'shard_samples' is not an object of counts")
    return counts, None


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
