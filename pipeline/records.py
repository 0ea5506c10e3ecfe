"""The DST-augmented dialogue records (docs/design.md §2): reading, validating, typed access.

A file is a JSON list of video records. Each record is a ProAssist `generated_dialogs` record plus a `dst` list of
flat step nodes. `parse_record` turns one raw dict into a `VideoRecord` or raises `RecordError` naming the record
and the reason, so a caller can skip that record and keep the rest.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import InputError
from core.safe_names import name_problem, quoted, shown

ROLES = ("user", "assistant")
NODE_STATES = ("not_started", "in_progress", "completed")
# Ids appear inside the DST update grammar (`S2=completed; S3=in_progress`), so they must not contain its separators.
NODE_ID_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
# Every time, start and duration is a number of seconds in [0, MAX_SECONDS]: a day is longer than any task video,
# and the bound keeps `fps * t` and every frame number derived from it small (a time of 1e308 once overflowed).
MAX_SECONDS = 86_400.0


class RecordError(InputError):
    """A record that cannot be used; `video_uid` names it (or its position when it has none)."""

    def __init__(self, video_uid: str, reason: str):
        super().__init__(f"{video_uid}: {reason}")
        self.video_uid = video_uid
        self.reason = reason


class InputFileError(InputError):
    """The input file as a whole cannot be read (missing, malformed JSON, wrong top-level type)."""


@dataclass(frozen=True)
class DSTNode:
    id: str
    name: str
    start_ts: float
    end_ts: float


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    time: float  # absolute seconds in the video
    content: str
    labels: str = ""  # the turn's intent labels, e.g. "initiative|instruction" ("" when absent)
    progress: str = ""  # ProAssist's progress summary at this assistant turn ("" when absent)


@dataclass(frozen=True)
class Conversation:
    user_type: str
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class VideoRecord:
    video_uid: str
    dataset: str
    goal: str
    knowledge: str
    video_start_time: float
    nodes: tuple[DSTNode, ...]
    conversations: tuple[Conversation, ...]
    duration: float | None = None

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(n.id for n in self.nodes)


def load_record_list(path: str | Path) -> list[Any]:
    """Read the JSON list of raw records; malformed input raises `InputFileError` with the position."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputFileError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{path}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputFileError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} (char {exc.pos}): {exc.msg}"
        ) from None
    except RecursionError:
        raise InputFileError(f"{path}: invalid JSON: nested too deeply to parse") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise InputFileError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(data, list):
        raise InputFileError(f"{path}: expected a JSON list of video records, found a JSON {type(data).__name__}")
    return data


def record_name(raw: Any, index: int) -> str:
    """The name used in messages: the record's video_uid when it has a usable one, else its position."""
    if isinstance(raw, dict) and isinstance(raw.get("video_uid"), str) and raw["video_uid"].strip():
        return shown(raw["video_uid"])
    return f"record #{index}"


def _seconds(value: Any, what: str, name: str) -> float:
    """A time or duration in seconds, within [0, MAX_SECONDS]."""
    # bool is an int subclass in Python; `true` is not a time.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(name, f"{what} is {'missing' if value is None else f'not a number ({quoted(value)})'}")
    try:
        seconds = float(value)  # an int beyond the float range raises OverflowError
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds):
        raise RecordError(name, f"{what} is not finite ({quoted(value)})")
    if not 0.0 <= seconds <= MAX_SECONDS:
        raise RecordError(name, f"{what} is {quoted(value)}, outside [0, {MAX_SECONDS:.0f}] seconds")
    return seconds


def _string(value: Any, what: str, name: str, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise RecordError(name, f"{what} is {'missing' if value is None else f'not a string ({quoted(value)})'}")
    if not allow_empty and not value.strip():
        raise RecordError(name, f"{what} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: a valid JSON escape that no output file can hold
        raise RecordError(name, f"{what} is not valid Unicode ({quoted(value)})") from None
    return value


def _file_name(value: Any, what: str, name: str) -> str:
    """A value that becomes a path component (video_uid, dataset): nothing that leads outside a folder."""
    value = _string(value, what, name, allow_empty=False)
    problem = name_problem(value)
    if problem:
        raise RecordError(name, f"{what} {quoted(value)} {problem}; it is used as a file name")
    return value


def _optional_string(value: Any, what: str, name: str) -> str:
    return "" if value is None else _string(value, what, name)


def _parse_nodes(raw_dst: Any, name: str) -> tuple[DSTNode, ...]:
    if not isinstance(raw_dst, list):
        raise RecordError(name, f"'dst' is not a list ({type(raw_dst).__name__})")
    if not raw_dst:
        raise RecordError(name, "'dst' is empty")
    nodes, seen = [], set()
    for i, raw in enumerate(raw_dst):
        where = f"dst[{i}]"
        if not isinstance(raw, dict):
            raise RecordError(name, f"{where} is not an object")
        node_id = _string(raw.get("id"), f"{where}.id", name, allow_empty=False)
        if not NODE_ID_PATTERN.match(node_id):
            raise RecordError(name, f"{where}.id {quoted(node_id)} is not a plain identifier (letters, digits, '_')")
        if node_id in seen:
            raise RecordError(name, f"duplicate node id {quoted(node_id)}")
        seen.add(node_id)
        node_type = raw.get("type", "step")
        if node_type != "step":
            raise RecordError(
                name, f"node {node_id} has type {quoted(node_type)}; only flat 'step' nodes are supported"
            )
        nodes.append(
            DSTNode(
                id=node_id,
                name=_string(raw.get("name"), f"node {node_id} name", name),
                start_ts=_seconds(raw.get("start_ts"), f"node {node_id} start_ts", name),
                end_ts=_seconds(raw.get("end_ts"), f"node {node_id} end_ts", name),
            )
        )
    return tuple(nodes)


def _parse_conversations(raw_convs: Any, name: str) -> tuple[Conversation, ...]:
    if not isinstance(raw_convs, list):
        raise RecordError(name, "'conversations' is missing or not a list")
    if not raw_convs:
        raise RecordError(name, "'conversations' is empty")
    convs = []
    for c, raw in enumerate(raw_convs):
        where = f"conversations[{c}]"
        if not isinstance(raw, dict):
            raise RecordError(name, f"{where} is not an object")
        user_type = _string(raw.get("user_type"), f"{where}.user_type", name)
        raw_turns = raw.get("conversation")
        if not isinstance(raw_turns, list):
            raise RecordError(name, f"{where}.conversation is missing or not a list")
        turns = []
        for t, turn in enumerate(raw_turns):
            at = f"{where} turn {t}"
            if not isinstance(turn, dict):
                raise RecordError(name, f"{at} is not an object")
            role = turn.get("role")
            if role not in ROLES:
                raise RecordError(name, f"{at} has role {quoted(role)}; expected 'user' or 'assistant'")
            turns.append(
                Turn(
                    role=role,
                    time=_seconds(turn.get("time"), f"{at} time", name),
                    content=_string(turn.get("content"), f"{at} content", name),
                    labels=_optional_string(turn.get("labels"), f"{at} labels", name),
                    progress=_optional_string(turn.get("progress"), f"{at} progress", name),
                )
            )
        convs.append(Conversation(user_type=user_type, turns=tuple(turns)))
    return tuple(convs)


def parse_record(raw: Any, index: int = 0) -> VideoRecord:
    """Validate one raw record; raise `RecordError(name, reason)` for the first problem found."""
    name = record_name(raw, index)
    if not isinstance(raw, dict):
        raise RecordError(name, f"not a JSON object ({type(raw).__name__})")
    video_uid = _file_name(raw.get("video_uid"), "video_uid", name)
    anns = raw.get("parsed_video_anns")
    if not isinstance(anns, dict):
        raise RecordError(name, "'parsed_video_anns' is missing or not an object")
    dataset = _file_name(anns.get("dataset"), "parsed_video_anns.dataset", name)
    start = anns.get("video_start_time")
    video_start_time = 0.0 if start is None else _seconds(start, "parsed_video_anns.video_start_time", name)
    duration = anns.get("duration")
    if duration is not None:
        duration = _seconds(duration, "parsed_video_anns.duration", name)
        if duration == 0:
            raise RecordError(name, "parsed_video_anns.duration is 0")
    if "dst" not in raw:
        raise RecordError(name, "no 'dst' key")
    nodes = _parse_nodes(raw["dst"], name)
    return VideoRecord(
        video_uid=video_uid,
        dataset=dataset,
        goal=_string(raw.get("inferred_goal", ""), "inferred_goal", name),
        knowledge=_string(raw.get("inferred_knowledge", ""), "inferred_knowledge", name),
        video_start_time=video_start_time,
        nodes=nodes,
        conversations=_parse_conversations(raw.get("conversations"), name),
        duration=duration,
    )
