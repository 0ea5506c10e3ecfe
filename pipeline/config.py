"""The resolved configuration of `dst prepare`, from command-line options over a data config file.

The data config file (TOML, default `configs/data.toml`) names the data paths per split, so that
`dst prepare --split train` alone works:

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

from pipeline.checks import ConfigError, fps_problem, number_problem
from pipeline.embeddings import DEFAULT_TOKENS_PER_FRAME, parse_tokens_per_frame
from pipeline.timeline import DEFAULT_FPS

DEFAULT_CONFIG = Path("configs/data.toml")




@dataclass(frozen=True)
class PrepareConfig:
    split: str
    dst_json: tuple[Path, ...]
    model: str
    out: Path
    frames_root: Path | None = None
    videos_root: Path | None = None
    tokens_per_frame: int | str = DEFAULT_TOKENS_PER_FRAME
    fps: float = DEFAULT_FPS
    batch_size: int = 32
    device: str = "auto"  # "auto": cuda:{LOCAL_RANK} when CUDA is available, else cpu
    shard_size_mb: float = 1024.0
    strict: bool = False
    max_videos: int | None = None
    workers: int | None = None  # decoding processes beside the encoder; None: min(4, CPUs - 1); 0: in-process


_PATHS = {"frames_root", "videos_root", "out"}
_KNOWN = {f.name for f in fields(PrepareConfig)}


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
    unknown = set(values) - _KNOWN
    if unknown:
        raise ConfigError(f"config file {path}: unknown settings {sorted(unknown)} for split {split!r}")
    base = path.parent
    for key in _PATHS & set(values):
        values[key] = base / values[key]
    if "dst_json" in values:
        files = values["dst_json"] if isinstance(values["dst_json"], list) else [values["dst_json"]]
        values["dst_json"] = tuple(base / f for f in files)
    return values


def resolve(split: str, options: dict[str, Any], config_path: Path | None = None) -> PrepareConfig:
    """Options given on the command line (None = not given) over the config file over the defaults. The config
    file is read when `config_path` is given, or when the default one exists."""
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
        raise ConfigError(f"no --dst-json given and no dst_json for split {split!r} in "
                          f"{path or f'a config file (default {DEFAULT_CONFIG} does not exist)'}")
    if not values.get("model"):
        raise ConfigError("no --model given and none in the config file")
    if (values.get("frames_root") is None) == (values.get("videos_root") is None):
        raise ConfigError("give exactly one of --frames-root (ProAssist frames files) and --videos-root (raw videos)")
    values["dst_json"] = tuple(Path(p) for p in values["dst_json"])
    try:
        values["tokens_per_frame"] = parse_tokens_per_frame(values.get("tokens_per_frame", DEFAULT_TOKENS_PER_FRAME))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    cfg = PrepareConfig(**values)
    problem = (fps_problem(cfg.fps) or number_problem("batch_size", cfg.batch_size, minimum=1, integer=True)
               or number_problem("shard_size_mb", cfg.shard_size_mb, minimum=0, above_minimum=True)
               or (cfg.max_videos is not None and number_problem("max_videos", cfg.max_videos, minimum=1,
                                                                 integer=True))
               or (cfg.workers is not None and number_problem("workers", cfg.workers, minimum=0, integer=True)))
    if problem:
        raise ConfigError(problem)
    return cfg
