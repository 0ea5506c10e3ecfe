"""The shard format, read and written here only: WebDataset tars with one sample per video.

A sample has exactly two members. `emb.npy` is float16 `[n_stream_frames, tokens_per_frame, hidden]` with row 0 =
frame `k0` (never absolute frame numbers: an earlier attempt indexed per-clip features with absolute frames).
`json` is the video's `VideoMeta`: metadata, DST nodes, conversations and the per-point labels that training and
eval read (`VideoMeta.from_labels` builds it, `to_json` writes it, `from_json` reads and checks it). Shards are
written deterministically (fixed member order, mtime, owner), so rerunning the same command reproduces them byte
for byte. Random access to the samples of a shard folder is pipeline/shard_index.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from core.errors import InputError
from core.files import atomic_path
from pipeline.labels import label_columns, state_json
from pipeline.records import NODE_STATES
from pipeline.timeline import VideoLabels

EMB, META = "emb.npy", "json"
SHARD_PATTERN = "shard-{:06d}.tar"
MANIFEST = "manifest.json"
KEY_TEXT = 80  # characters of readable text in a key; the hash keeps longer uids apart


class ShardFormatError(InputError):
    """A shard that does not hold what `dst prepare` writes; the message names the shard file (and the sample)."""


# ----------------------------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class Node:
    id: str
    name: str
    start_ts: float
    end_ts: float


@dataclass(frozen=True)
class ConversationMeta:
    """One conversation's labels per decision point (lists aligned with `VideoMeta.frame`) and its raw turns."""

    conversation: int  # position in the record's `conversations`
    user_type: str
    user_text: list[str]  # user text placed just before the frame ("" if none)
    speak: list[bool]
    response: list[str]
    progress: list[str]  # ProAssist's progress summary of the response there ("" if none)
    response_labels: list[str]  # the response's intent labels, e.g. "initiative|instruction"
    turns: list[dict]  # the record's turns: {role, time, content}


@dataclass(frozen=True)
class VideoMeta:
    """Everything training and eval need besides the embeddings. Per-point lists start at frame k0, like the rows
    of `emb.npy` and the rows `dst labels` writes. Shared and cached by the index: treat it as read-only."""

    video_uid: str
    dataset: str
    fps: float
    first_frame: int
    num_frames: int
    tokens_per_frame: int | str
    model: str
    goal: str
    knowledge: str
    nodes: list[Node]
    initial_state: dict[str, str]
    frame: list[int]  # the absolute frame of each decision point
    time: list[float]
    dst_update: list[bool]
    dst_delta: list[str]  # the update at the point, serialised ("" if none)
    dst_state: list[str]  # the state after the point, serialised
    conversations: list[ConversationMeta]

    @property
    def num_rows(self) -> int:
        return len(self.frame)

    @classmethod
    def from_labels(cls, labels: VideoLabels, model: str, tokens_per_frame: int | str) -> VideoMeta:
        rec, cols, n = labels.record, label_columns(labels), len(labels.points)
        return cls(
            video_uid=rec.video_uid,
            dataset=rec.dataset,
            fps=labels.fps,
            first_frame=labels.k0,
            num_frames=labels.n_frames,
            tokens_per_frame=tokens_per_frame,
            model=model,
            goal=rec.goal,
            knowledge=rec.knowledge,
            nodes=[Node(x.id, x.name, x.start_ts, x.end_ts) for x in rec.nodes],
            initial_state=json.loads(state_json(labels.dst.initial)),
            frame=cols["frame"][:n],
            time=cols["time"][:n],
            dst_update=cols["dst_update"][:n],
            dst_delta=cols["dst_delta"][:n],
            dst_state=cols["dst_state"][:n],
            conversations=[
                ConversationMeta(
                    c.index,
                    c.user_type,
                    cols["user_text"][i * n : (i + 1) * n],
                    cols["speak"][i * n : (i + 1) * n],
                    cols["response"][i * n : (i + 1) * n],
                    cols["progress"][i * n : (i + 1) * n],
                    [c.response_labels.get(k, "") for k in labels.points],
                    [{"role": t.role, "time": t.time, "content": t.content} for t in rec.conversations[c.index].turns],
                )
                for i, c in enumerate(labels.conversations)
            ],
        )

    def to_json(self) -> dict:
        """The `json` member as written on disk."""
        return {
            "video_uid": self.video_uid,
            "dataset": self.dataset,
            "fps": self.fps,
            "first_frame": self.first_frame,
            "num_frames": self.num_frames,
            "tokens_per_frame": self.tokens_per_frame,
            "model": self.model,
            "goal": self.goal,
            "knowledge": self.knowledge,
            "nodes": [{"id": x.id, "name": x.name, "start_ts": x.start_ts, "end_ts": x.end_ts} for x in self.nodes],
            "initial_state": self.initial_state,
            "conversations": [{"user_type": c.user_type, "turns": c.turns} for c in self.conversations],
            "labels": {
                "frame": self.frame,
                "time": self.time,
                "dst_update": self.dst_update,
                "dst_delta": self.dst_delta,
                "dst_state": self.dst_state,
                "conversations": [
                    {
                        "conversation": c.conversation,
                        "user_type": c.user_type,
                        "user_text": c.user_text,
                        "speak": c.speak,
                        "response": c.response,
                        "progress": c.progress,
                        "response_labels": c.response_labels,
                    }
                    for c in self.conversations
                ],
            },
        }

    @classmethod
    def from_json(cls, meta: Any, where: str, checked: bool = False) -> VideoMeta:
        """The record of a `json` member, after checking every field training and eval read, with consistent
        lengths; otherwise `ShardFormatError` naming the shard and the sample (a corrupt or hand-edited sample
        would otherwise fail deep inside a DataLoader worker with a KeyError). `checked`: this member was checked
        already (the index checks every sample once when it is built)."""
        if not checked:
            _validate(meta, where)
        labels = meta["labels"]
        return cls(
            video_uid=meta["video_uid"],
            dataset=meta["dataset"],
            fps=meta["fps"],
            first_frame=meta["first_frame"],
            num_frames=meta["num_frames"],
            tokens_per_frame=meta["tokens_per_frame"],
            model=meta["model"],
            goal=meta["goal"],
            knowledge=meta["knowledge"],
            nodes=[Node(x["id"], x["name"], x["start_ts"], x["end_ts"]) for x in meta["nodes"]],
            initial_state=meta["initial_state"],
            frame=labels["frame"],
            time=labels["time"],
            dst_update=labels["dst_update"],
            dst_delta=labels["dst_delta"],
            dst_state=labels["dst_state"],
            conversations=[
                ConversationMeta(
                    c["conversation"],
                    c["user_type"],
                    c["user_text"],
                    c["speak"],
                    c["response"],
                    c["progress"],
                    c["response_labels"],
                    raw["turns"],
                )
                for c, raw in zip(labels["conversations"], meta["conversations"])
            ],
        )


def _fail(where: str, what: str) -> None:
    raise ShardFormatError(f"{where}: json {what}")


def _list(value: Any, what: str, where: str, kind: type | tuple, n: int | None) -> list:
    if not isinstance(value, list):
        _fail(where, f"{what} is not a list")
    if n is not None and len(value) != n:
        _fail(where, f"{what} has {len(value)} entries for {n} points")
    # bool is an int subclass: a list of frame numbers must not pass with true/false in it, and vice versa.
    if not all(isinstance(x, kind) and (kind is bool or not isinstance(x, bool)) for x in value):
        _fail(where, f"{what} holds a value that is not {getattr(kind, '__name__', kind)}")
    return value


def _state(text: str, what: str, where: str, node_ids: set[str]) -> None:
    """A serialised DST state or delta: a JSON object {node id: state}."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        _fail(where, f"{what} is not JSON")
    if not isinstance(value, dict) or not all(k in node_ids and v in NODE_STATES for k, v in value.items()):
        _fail(where, f"{what} is not an object of known node ids and states")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate(meta: Any, where: str) -> None:
    if not isinstance(meta, dict):
        _fail(where, "is not an object")
    for name in ("video_uid", "dataset", "goal", "knowledge", "model"):
        if not isinstance(meta.get(name), str):
            _fail(where, f"{name} is missing or not a string")
    fps = meta.get("fps")
    if not _number(fps) or fps <= 0:
        _fail(where, "fps is missing or not a positive number")
    for name in ("first_frame", "num_frames"):
        if not isinstance(meta.get(name), int) or isinstance(meta.get(name), bool) or meta[name] < 0:
            _fail(where, f"{name} is missing or not a frame count")
    tokens = meta.get("tokens_per_frame")
    if tokens != "all" and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1):
        _fail(where, "tokens_per_frame is missing or not a positive integer or 'all'")
    nodes = _list(meta.get("nodes"), "nodes", where, dict, None)
    if not all(
        isinstance(x.get("id"), str)
        and isinstance(x.get("name"), str)
        and _number(x.get("start_ts"))
        and _number(x.get("end_ts"))
        for x in nodes
    ):
        _fail(where, "nodes need string 'id' and 'name' and numbers 'start_ts' and 'end_ts'")
    node_ids = {x["id"] for x in nodes}
    initial = meta.get("initial_state")
    if not isinstance(initial, dict) or not all(k in node_ids and v in NODE_STATES for k, v in initial.items()):
        _fail(where, "initial_state is not an object of known node ids and states")
    labels = meta.get("labels")
    if not isinstance(labels, dict):
        _fail(where, "labels is missing or not an object")
    n = len(_list(labels.get("frame"), "labels.frame", where, int, None))
    _list(labels.get("time"), "labels.time", where, (int, float), n)
    _list(labels.get("dst_update"), "labels.dst_update", where, bool, n)
    deltas = _list(labels.get("dst_delta"), "labels.dst_delta", where, str, n)
    states = _list(labels.get("dst_state"), "labels.dst_state", where, str, n)
    for delta in {d for d in deltas if d}:
        _state(delta, "labels.dst_delta entry", where, node_ids)
    for state in set(states):  # a state changes rarely: each distinct string is parsed once
        _state(state, "labels.dst_state entry", where, node_ids)
    convs = _list(labels.get("conversations"), "labels.conversations", where, dict, None)
    for c, conv in enumerate(convs):
        at = f"labels.conversations[{c}]"
        if not isinstance(conv.get("conversation"), int) or not isinstance(conv.get("user_type"), str):
            _fail(where, f"{at} needs an integer 'conversation' and a string 'user_type'")
        _list(conv.get("user_text"), f"{at}.user_text", where, str, n)
        _list(conv.get("speak"), f"{at}.speak", where, bool, n)
        _list(conv.get("response"), f"{at}.response", where, str, n)
        _list(conv.get("progress"), f"{at}.progress", where, str, n)
        _list(conv.get("response_labels"), f"{at}.response_labels", where, str, n)
    raw = meta.get("conversations")
    if not isinstance(raw, list) or len(raw) != len(convs):
        _fail(where, "conversations is missing or does not match labels.conversations")
    if not all(isinstance(c, dict) and isinstance(c.get("turns"), list) for c in raw):
        _fail(where, "conversations need a 'turns' list")


# ----------------------------------------------------------------------------------------------- tars


def sample_key(dataset: str, video_uid: str) -> str:
    """A tar-safe key, unique by construction: the readable `{dataset}__{video_uid}` with every character outside
    [A-Za-z0-9_-] replaced by `_` (WebDataset splits member names at the first dot) and cut to KEY_TEXT characters,
    plus a hash of the exact (dataset, video_uid), so `a.b` and `a_b` (or two non-ASCII uids) get different keys."""
    text = re.sub(r"[^A-Za-z0-9_-]", "_", f"{dataset}__{video_uid}")[:KEY_TEXT]
    exact = f"{dataset}\0{video_uid}".encode("utf-8", "surrogatepass")
    return f"{text}-{hashlib.blake2b(exact, digest_size=6).hexdigest()}"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_sample(key: str, emb: np.ndarray, meta: VideoMeta) -> dict:
    if emb.dtype != np.float16 or emb.ndim != 3:
        raise ValueError(f"{key}: embeddings must be float16 [frames, tokens, hidden], got {emb.dtype} {emb.shape}")
    if emb.shape[0] != meta.num_rows:
        raise ValueError(f"{key}: {emb.shape[0]} embedding rows for {meta.num_rows} decision points")
    return sample_bytes(key, emb, meta.to_json())


def sample_bytes(key: str, emb: np.ndarray, meta_json: dict) -> dict:
    """The tar members of a sample, unchecked (tests write corrupt samples with it)."""
    return {"__key__": key, EMB: npy_bytes(emb), META: json.dumps(meta_json, ensure_ascii=False).encode("utf-8")}


def write_shard(path: Path, samples: Iterable[dict]) -> None:
    """Write encoded samples to `path` under a temporary name, then rename: a shard on disk is always complete."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0.0, user="dst", group="dst", mode=0o444)
        for sample in samples:
            writer.write(sample)
        writer.close()


def read_shard(path: str | Path) -> Iterator[tuple[str, np.ndarray, VideoMeta]]:
    """(key, embeddings, meta) for every sample of a shard, in order, reading the whole shard (tests and tools;
    training reads rows by offset through pipeline/shard_index.py). A shard that is not what `dst prepare` writes
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
            raise ShardFormatError(
                f"{where}: {EMB} must be float16 [frames, tokens, hidden], got {emb.dtype} {list(emb.shape)}"
            )
        meta = VideoMeta.from_json(parse_meta(parts[META], where), where)
        if meta.num_rows != emb.shape[0]:
            raise ShardFormatError(f"{where}: {emb.shape[0]} embedding rows for {meta.num_rows} label points")
        yield key, emb, meta


def parse_meta(data: bytes, where: str) -> object:
    """The `json` member's value; `ShardFormatError` when it is not JSON."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ShardFormatError(
            f"{where}: unreadable {META}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        ) from None


def expected_samples(shard_dir: Path) -> tuple[dict[str, int] | None, str | None]:
    """(samples per shard file name, None) from the folder's manifest.json, or (None, a warning) for a shard folder
    copied without its manifest: truncation at a sample boundary cannot be detected there."""
    path = shard_dir / MANIFEST
    if not path.is_file():
        return None, f"{shard_dir} has no {MANIFEST}: cannot check that every shard holds all its samples"
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise ShardFormatError(f"{path}: unreadable ({exc})") from None
    counts = manifest.get("shard_samples") if isinstance(manifest, dict) else None
    if not isinstance(counts, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in counts.values()):
        raise ShardFormatError(f"{path}: 'shard_samples' is missing or not an object of counts")
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
