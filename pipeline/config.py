"""The settings of `dst labels` and `dst prepare`, declared once (core/settings.py).

`dst prepare` also reads a data config file (TOML, default `configs/data.toml`) that names the data paths per
split, so that `dst prepare --split train` alone works:

    [prepare]                       # defaults for every split
    model = "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"
    tokens_per_frame = 5

    [splits.train]
    dst_json = ["data/dst/assembly101/train.json", "data/dst/ego4d/train.json"]
    frames_root = "data/processed_data"

Relative paths are resolved against the config file's folder. Options given on the command line win.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from core.runtime import DEVICE_HELP
from core.settings import MAX_FPS, ConfigError, check, setting
from pipeline.timeline import DEFAULT_FPS

DEFAULT_CONFIG = Path("configs/data.toml")
ALL = "all"
DEFAULT_TOKENS_PER_FRAME = 5
TOKENS_PER_FRAME_OPTIONS: tuple[int | str, ...] = (1, 5, 17, ALL)


def parse_tokens_per_frame(value: int | str) -> int | str:
    """`"all"` or a positive int (CLI strings such as `"5"` included); anything else is a ValueError."""
    if isinstance(value, str):
        if value.strip().lower() == ALL:
            return ALL
        if not value.strip().isdigit():
            raise ValueError(f"tokens_per_frame must be a positive integer or {ALL!r}, got {value!r}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"tokens_per_frame must be a positive integer or {ALL!r}, got {value!r}")
    return value


def fps_setting(help: str):
    return setting(DEFAULT_FPS, help, minimum=0, maximum=MAX_FPS, above=True)


@dataclass(frozen=True)
class LabelsConfig:
    dst_json: Path = setting(help="DST-augmented dialogues: a JSON list of video records.")
    frames_root: Path = setting(help="ProAssist processed_data folder ({dataset}/frames/{name}.arrow).")
    out: Path = setting(help="Output parquet file, one row per (video, conversation, decision point).")
    fps: float = fps_setting("Frame rate of the frames files.")
    strict: bool = setting(False, "Fail (exit 1, write nothing) if any record is unusable.")

    def __post_init__(self):
        check(self)


@dataclass(frozen=True)
class PrepareConfig:
    split: str = setting(help="Split name; picks [splits.<split>] in the config file.")
    dst_json: tuple[Path, ...] = setting(help="DST-augmented dialogues (repeatable). Default: the config file's.")
    model: str = setting(help="SmolVLM2 hub id, local folder, smollm2-135m or tiny-random.")
    out: Path = setting(help="Output folder. Default: shards/<split>.")
    frames_root: Path | None = setting(None, "ProAssist processed_data folder ({dataset}/frames/{name}.arrow).")
    videos_root: Path | None = setting(None, "Raw videos folder ({dataset}/{video_uid}.mp4), instead of frames.")
    tokens_per_frame: int | str = setting(DEFAULT_TOKENS_PER_FRAME, "1, 5 (mean + 2x2), 17 (mean + 4x4) or all.")
    fps: float = fps_setting("Frame rate of the stream.")
    batch_size: int = setting(32, "Frames per encoder batch.", minimum=1)
    device: str = setting("auto", DEVICE_HELP + "; under torchrun each rank takes cuda:LOCAL_RANK.")
    shard_size_mb: float = setting(1024.0, "Target shard size in MiB.", minimum=0, above=True)
    strict: bool = setting(False, "Fail if any record is unusable.")
    max_videos: int | None = setting(None, "Only the first N usable videos (for trials).", minimum=1)
    workers: int | None = setting(
        None,
        "Processes that decode and resize frames ahead of the encoder (default "
        "min(4, CPUs - 1); 0: in the main process).",
        minimum=0,
    )

    def __post_init__(self):
        check(self)


_PATHS = {"frames_root", "videos_root", "out"}


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def _from_file(split: str, path: Path) -> dict[str, Any]:
    data = read_config_file(path)
    splits = data.get("splits", {})
    if split not in splits:
        raise ConfigError(f"config file {path} has no [splits.{split}] (it has: {', '.join(splits) or 'none'})")
    values = {**data.get("prepare", {}), **splits[split]}
    unknown = set(values) - {f.name for f in fields(PrepareConfig)}
    if unknown:
        raise ConfigError(f"config file {path}: unknown settings {sorted(unknown)} for split {split!r}")
    base = path.parent
    for key in _PATHS & set(values):
        values[key] = base / values[key]
    if "dst_json" in values:
        files = values["dst_json"] if isinstance(values["dst_json"], list) else [values["dst_json"]]
        values["dst_json"] = tuple(base / f for f in files)
    return values


def resolve(split: str | None, options: dict[str, Any], config_path: Path | None = None) -> PrepareConfig:
    """Options given on the command line (None = not given) over the config file over the defaults. The config
    file is read when `config_path` is given, or when the default one exists."""
    if not split:
        raise ConfigError("--split is required")
    options = {k: v for k, v in options.items() if k != "split"}
    path = config_path if config_path is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    values = _from_file(split, path) if path is not None else {}
    given = {k: v for k, v in options.items() if v is not None and v != ()}
    if given.keys() & {"frames_root", "videos_root"}:  # a source given on the command line replaces the file's
        values.pop("frames_root", None)
        values.pop("videos_root", None)
    values.update(given)
    values["split"] = split
    values.setdefault("out", Path("shards") / split)
    if not values.get("dst_json"):
        raise ConfigError(
            f"no --dst-json given and no dst_json for split {split!r} in "
            f"{path or f'a config file (default {DEFAULT_CONFIG} does not exist)'}"
        )
    if not values.get("model"):
        raise ConfigError("no --model given and none in the config file")
    if (values.get("frames_root") is None) == (values.get("videos_root") is None):
        raise ConfigError("give exactly one of --frames-root (ProAssist frames files) and --videos-root (raw videos)")
    values["dst_json"] = tuple(Path(p) for p in values["dst_json"])
    try:
        values["tokens_per_frame"] = parse_tokens_per_frame(values.get("tokens_per_frame", DEFAULT_TOKENS_PER_FRAME))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return PrepareConfig(**values)
