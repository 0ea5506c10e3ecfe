"""Strict JSON out, validated predictions in.

Every JSON file eval writes (metrics.json, thresholds.json, predictions.jsonl) goes through `sanitize`: a
non-finite float (NaN, +-inf, from a corrupt model output or a zero division) becomes `null` and is counted, numpy
scalars become Python numbers, and the text is dumped with `allow_nan=False`, so no file ever holds a bare `NaN` or
`Infinity` (which strict JSON parsers reject). Writes are atomic: a temporary name in the same folder, then a
rename, so a failure never leaves a half-written file in place of a good one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import InputError
from core.files import write_atomic
from eval.protocol import PROTOCOLS


class PredictionsError(InputError):
    """predictions.jsonl cannot be scored: the one-line message names the file, the line and the reason."""


def sanitize(obj: Any) -> tuple[Any, int]:
    """(a JSON-safe copy of `obj`, number of non-finite floats turned into None)."""
    count = 0

    def walk(x):
        nonlocal count
        if isinstance(x, dict):
            return {str(k): walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        if isinstance(x, np.ndarray):
            return [walk(v) for v in x.tolist()]
        if isinstance(x, (bool, np.bool_)):
            return bool(x)
        if isinstance(x, (int, np.integer)):
            return int(x)
        if isinstance(x, (float, np.floating)):
            if math.isfinite(float(x)):
                return float(x)
            count += 1
            return None
        return x

    return walk(obj), count


def dumps(obj: Any, **kwargs) -> tuple[str, int]:
    """Strict JSON text of `obj` (non-finite floats as null) and how many were replaced."""
    clean, count = sanitize(obj)
    return json.dumps(clean, allow_nan=False, **kwargs), count


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> int:
    """One JSON document, atomically; returns the number of non-finite floats written as null."""
    text, count = dumps(obj, indent=indent)
    write_atomic(Path(path), text + "\n")
    return count


def write_jsonl(path: str | Path, records: Iterable[Any]) -> int:
    """One JSON document per line, atomically; returns the number of non-finite floats written as null."""
    lines, total = [], 0
    for record in records:
        text, count = dumps(record)
        lines.append(text)
        total += count
    write_atomic(Path(path), "".join(line + "\n" for line in lines))
    return total


# ----------------------------------------------------------------------------------------------- reading

# What the scorer reads from each frame record; anything else is optional (old files lack the newer keys).
FRAME_TEXT_KEYS = ("pred_text", "ref_text")
FRAME_DICT_KEYS = ("pred_dst_delta", "ref_dst_delta", "pred_state", "ref_state")


def _constant_as_null(name: str) -> None:
    """Old files may hold a bare NaN/Infinity (a probability of a corrupt output): read it as null."""
    return None


def check_dialogue(d: Any, where: str) -> None:
    """Raise PredictionsError naming `where` unless `d` is a dialogue record the scorer can use."""
    if not isinstance(d, dict):
        raise PredictionsError(f"{where}: a dialogue record must be a JSON object, got {type(d).__name__}")
    for key in ("dataset", "fps", "frames", "variant", "protocol"):
        if key not in d:
            raise PredictionsError(f"{where}: the record lacks '{key}'")
    if d["protocol"] not in PROTOCOLS:
        raise PredictionsError(f"{where}: 'protocol' must be one of {', '.join(PROTOCOLS)}, got {d['protocol']!r}")
    if not isinstance(d["dataset"], str) or not d["dataset"]:
        raise PredictionsError(f"{where}: 'dataset' must be a non-empty string")
    fps = d["fps"]
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise PredictionsError(f"{where}: 'fps' must be a positive number, got {fps!r}")
    frames = d["frames"]
    if not isinstance(frames, list):
        raise PredictionsError(f"{where}: 'frames' must be a list")
    last = None
    for n, f in enumerate(frames):
        if not isinstance(f, dict):
            raise PredictionsError(f"{where}: frame record {n} is not a JSON object")
        k = f.get("frame")
        if isinstance(k, bool) or not isinstance(k, int):
            raise PredictionsError(f"{where}: frame record {n} has no integer 'frame'")
        if last is not None and k != last + 1:
            raise PredictionsError(f"{where}: frame {k} follows frame {last}; frames must be consecutive")
        last = k
        for key in FRAME_TEXT_KEYS:
            if not isinstance(f.get(key), str):
                raise PredictionsError(f"{where}: frame {k} has no text '{key}'")
        for key in FRAME_DICT_KEYS:
            if f.get(key) is not None and not isinstance(f[key], dict):
                raise PredictionsError(f"{where}: frame {k}: '{key}' must be an object or null")
    reseeds = d.get("reseeds") or []
    if not isinstance(reseeds, list) or not all(
        isinstance(r, dict) and isinstance(r.get("frame"), int) for r in reseeds
    ):
        raise PredictionsError(f"{where}: 'reseeds' must be a list of objects with an integer 'frame'")


def read_predictions(path: str | Path) -> list[dict]:
    """predictions.jsonl, one dialogue per non-empty line, validated. Any problem (missing or unreadable file,
    malformed or pathologically nested JSON, a record the scorer cannot use, no record at all) raises
    PredictionsError with one line naming the file and line. A bare NaN/Infinity (old files) is read as null."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PredictionsError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PredictionsError(f"{path}: cannot read it ({e})") from None
    dialogues = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            record = json.loads(line, parse_constant=_constant_as_null)
        except json.JSONDecodeError as e:
            raise PredictionsError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise PredictionsError(f"{where}: malformed JSON (nested too deeply)") from None
        check_dialogue(record, where)
        dialogues.append(record)
    if not dialogues:
        raise PredictionsError(f"{path}: no dialogue records (empty file)")
    return dialogues
