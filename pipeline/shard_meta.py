"""Checking a shard sample's `json` member before anything reads it.

Training and eval index into the per-point label lists by row and parse the DST strings; a corrupt or hand-edited
sample would otherwise fail deep inside a DataLoader worker with a KeyError. `validate_meta` checks every field
they read, once, and raises `ShardFormatError` naming the shard and the sample.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pipeline.records import NODE_STATES


class ShardFormatError(ValueError):
    """A shard that does not hold what `dst prepare` writes; the message names the shard file (and the sample)."""


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


def validate_meta(meta: Any, where: str) -> dict:
    """`meta` unchanged when it has every field training and eval read, with consistent lengths; otherwise
    `ShardFormatError`. Fields added later (`progress`, `response_labels`) are optional, so older shards load."""
    if not isinstance(meta, dict):
        _fail(where, "is not an object")
    for name in ("video_uid", "dataset", "goal"):
        if not isinstance(meta.get(name), str):
            _fail(where, f"{name} is missing or not a string")
    fps = meta.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not (math.isfinite(fps) and fps > 0):
        _fail(where, "fps is missing or not a positive number")
    nodes = _list(meta.get("nodes"), "nodes", where, dict, None)
    if not all(isinstance(x.get("id"), str) and isinstance(x.get("name"), str) for x in nodes):
        _fail(where, "nodes need string 'id' and 'name'")
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
        _list(conv.get("user_text"), f"{at}.user_text", where, str, n)
        _list(conv.get("speak"), f"{at}.speak", where, bool, n)
        _list(conv.get("response"), f"{at}.response", where, str, n)
        for optional in ("progress", "response_labels"):
            if optional in conv:
                _list(conv[optional], f"{at}.{optional}", where, str, n)
    raw = meta.get("conversations")
    if not isinstance(raw, list) or len(raw) != len(convs):
        _fail(where, "conversations is missing or does not match labels.conversations")
    return meta
