"""The configuration of `dst experiment`: one prepared dataset, shared train and eval settings, and a grid of cells.

    [experiment]  name, description, seeds = [0, 1, 2], baselines = ["never"] (test-only modes, no training),
                  curves = true (val learning curves over the checkpoints each training run keeps)
    [data]        setting = "demo" | "long", videos = [train, val, test], seed, model, tokens_per_frame
    [train]       any `dst train` setting (train/config.py) shared by every cell
    [eval]        stream settings shared by every cell: context_strategy, protocol, max_context, max_new_tokens,
                  max_summary_tokens, dst_window, sts_model, max_videos, device
    [[grid]]      a sub-grid: each key (a train or eval setting) lists its values; the cells are the union of the
                  products of every sub-grid, in file order, duplicates dropped
    [fast]        what `--fast` changes: videos, seeds, and [fast.train] / [fast.eval] settings
    [report]      columns = ["test.mean.speak.f1", {name = "...", key = ["first.choice", "fallback"]}, ...],
                  lower_is_better = [keys]
    [[compare]]   a = "cell name", b = "cell name": a paired comparison a - b (experiments/compare.py)

Every problem (unknown table or key, a value of the wrong type or out of range, a max_context past the training
max_seq_len) is found by `load` before anything runs, and named with the file and the key.
"""

from __future__ import annotations

import itertools
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from core.settings import ConfigError, hints, problem
from eval.columns import COLUMNS, PAIRED
from eval.config import EvalConfig, StreamConfig
from train.config import TrainConfig, TrainConfigError, resolve

SETTINGS = ("demo", "long")
BASELINES = ("never", "periodic", "oracle")
TABLES = {"experiment", "data", "train", "eval", "grid", "fast", "report", "compare"}
EXPERIMENT_KEYS = {"name", "description", "seeds", "baselines", "curves"}
DATA_DEFAULTS = {"setting": "demo", "videos": [120, 20, 20], "seed": 0, "model": "tiny-random", "tokens_per_frame": 5}
# The `dst eval` settings a cell may set; their types, ranges and defaults are eval/config.py's (sts_model None:
# the offline MiniLM if present).
EVAL_KEYS = (
    "context_strategy",
    "protocol",
    "max_context",
    "max_new_tokens",
    "max_summary_tokens",
    "dst_window",
    "sts_model",
    "max_videos",
    "device",
)
EVAL_FIELDS = {f.name: (f, hints(StreamConfig)[f.name]) for f in fields(StreamConfig) if f.name in EVAL_KEYS}
EVAL_FIELDS |= {f.name: (f, hints(EvalConfig)[f.name]) for f in fields(EvalConfig) if f.name in EVAL_KEYS}
EVAL_DEFAULTS = {key: None if key == "sts_model" else EVAL_FIELDS[key][0].default for key in EVAL_KEYS}
STREAM_KEYS = tuple(k for k in EVAL_KEYS if k not in {f.name for f in fields(EvalConfig)})  # the rest: EvalConfig
# Run by the runner itself, never set per cell: the data paths, the run folder, the seed (from `seeds`), resuming,
# and the model (prepare and train must use the same one: [data] model).
TRAIN_RESERVED = {"shards", "val_shards", "out", "seed", "resume", "model"}
TRAIN_KEYS = {f.name for f in fields(TrainConfig)} - TRAIN_RESERVED
FAST_DEFAULTS = {"videos": [8, 4, 4], "seeds": 2, "train": {"max_steps": 30}}
# eval/columns.py's experiment columns, each falling back to its paired block (speak_proassist -> speak) in results
# that lack it
DEFAULT_COLUMNS = [
    {
        "name": c.label,
        "key": [f"test.mean.{c.path}"] + ([f"test.mean.{PAIRED[c.block]}.{c.key}"] if c.block in PAIRED else []),
    }
    for c in COLUMNS
    if c.experiment
]


class ExperimentConfigError(ConfigError):
    pass


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its own settings (the grid's keys) over the shared ones."""

    index: int
    grid: dict[str, Any]  # the keys the grid set, in file order
    train: dict[str, Any]  # every train setting for this cell (shared + grid), without the reserved ones
    eval: dict[str, Any]

    @property
    def name(self) -> str:
        return " ".join(f"{k}={_show(v)}" for k, v in self.grid.items()) or "base"

    @property
    def slug(self) -> str:
        return _slug(self.grid) or "base"

    @property
    def train_slug(self) -> str:
        """Folder of this cell's training runs: cells that differ only in eval settings share it."""
        keys = {k: v for k, v in self.grid.items() if k in TRAIN_KEYS}
        digest = _digest(self.train)
        return f"{_slug(keys) or 'base'}-{digest}"


@dataclass(frozen=True)
class Column:
    name: str
    keys: tuple[str, ...]  # alternatives: the first present in the results is used
    lower_is_better: bool = False


@dataclass(frozen=True)
class ExperimentConfig:
    path: Path
    name: str
    description: str
    seeds: tuple[int, ...]
    baselines: tuple[str, ...]
    data: dict[str, Any]
    cells: tuple[Cell, ...]
    columns: tuple[Column, ...]
    fast: bool = False
    raw: dict = field(default_factory=dict, compare=False)
    curves: bool = False
    comparisons: tuple[tuple[str, str], ...] = ()

    def identity(self) -> dict:
        """What an output folder is bound to: a rerun into it must agree on these (cells and seeds may be added)."""
        return {"data": self.data, "fast": self.fast}


def _show(v) -> str:
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def _slug(d: dict) -> str:
    text = "_".join(f"{k}-{_show(v)}" for k, v in d.items())
    return "".join(c if c.isalnum() or c in "-_.=" else "-" for c in text)


def _digest(d: dict) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


# ----------------------------------------------------------------------------------------------- value checks


def _fail(path: Path, where: str, message: str):
    raise ExperimentConfigError(f"{path}: {where}: {message}")


def _check_type(path: Path, where: str, value, expected: type) -> None:
    found = problem(where.rsplit(".", 1)[-1], value, expected, {})
    if found:
        _fail(path, where, found.split(" ", 1)[1])


def _train_options(path: Path, where: str, table: dict) -> dict:
    types = hints(TrainConfig)
    for key, value in table.items():
        if key in TRAIN_RESERVED:
            _fail(path, f"{where}.{key}", "is set by the runner (seeds in [experiment], model in [data])")
        if key not in TRAIN_KEYS:
            _fail(path, f"{where}.{key}", f"unknown train setting (known: {', '.join(sorted(TRAIN_KEYS))})")
        _check_type(path, f"{where}.{key}", value, int | str if key == "batch_size" else types[key])
    # a token budget may be written as a number; TrainConfig holds it as text ("auto" or digits)
    return {k: str(v) if k == "batch_size" else v for k, v in table.items()}


def _eval_options(path: Path, where: str, table: dict) -> dict:
    for key, value in table.items():
        if key not in EVAL_FIELDS:
            _fail(path, f"{where}.{key}", f"unknown eval setting (known: {', '.join(EVAL_KEYS)})")
        f, tp = EVAL_FIELDS[key]
        found = problem(key, value, tp, f.metadata)
        if found:
            _fail(path, f"{where}.{key}", found.removeprefix(f"{key} "))
    return dict(table)


def _check_train(path: Path, where: str, options: dict) -> None:
    """train/config.py's own checks (ranges, names) on this cell's settings."""
    try:
        resolve({**options, "shards": "shards", "model": "tiny-random", "out": "run"})
    except (TrainConfigError, TypeError) as exc:
        _fail(path, where, str(exc))


def _data(path: Path, table: dict) -> dict:
    for key in table:
        if key not in DATA_DEFAULTS:
            _fail(path, f"data.{key}", f"unknown data setting (known: {', '.join(DATA_DEFAULTS)})")
    data = {**DATA_DEFAULTS, **table}
    if data["setting"] not in SETTINGS:
        _fail(path, "data.setting", f"must be one of {SETTINGS}, got {data['setting']!r}")
    videos = data["videos"]
    if not (isinstance(videos, list) and len(videos) == 3 and all(isinstance(v, int) and v >= 1 for v in videos)):
        _fail(path, "data.videos", f"must be [train, val, test] video counts >= 1, got {videos!r}")
    _check_type(path, "data.seed", data["seed"], int)
    _check_type(path, "data.model", data["model"], str)
    if data["tokens_per_frame"] not in (1, 5, 17, "all"):
        _fail(path, "data.tokens_per_frame", f'must be 1, 5, 17 or "all", got {data["tokens_per_frame"]!r}')
    return data


def _seeds(path: Path, value) -> tuple[int, ...]:
    if not (
        isinstance(value, list)
        and value
        and all(isinstance(s, int) and not isinstance(s, bool) for s in value)
        and len(set(value)) == len(value)
    ):
        _fail(path, "experiment.seeds", f"must be a non-empty list of distinct integers, got {value!r}")
    return tuple(value)


def _columns(path: Path, report: dict) -> tuple[Column, ...]:
    for key in report:
        if key not in ("columns", "lower_is_better"):
            _fail(path, f"report.{key}", "unknown report setting (known: columns, lower_is_better)")
    lower = set(report.get("lower_is_better", []))
    columns = []
    for i, spec in enumerate(report.get("columns", DEFAULT_COLUMNS)):
        if isinstance(spec, str):
            spec = {"name": spec, "key": [spec]}
        keys = spec.get("key") if isinstance(spec, dict) else None
        keys = [keys] if isinstance(keys, str) else keys
        if not (isinstance(keys, list) and keys and all(isinstance(k, str) for k in keys)) or set(spec) - {
            "name",
            "key",
        }:
            _fail(path, f"report.columns[{i}]", f"must be a key or {{name = ..., key = [keys]}}, got {spec!r}")
        columns.append(Column(str(spec.get("name", keys[0])), tuple(keys), any(k in lower for k in keys)))
    return tuple(columns)


# ----------------------------------------------------------------------------------------------- loading


def load(path: Path, fast: bool = False, overrides: dict | None = None) -> ExperimentConfig:
    """The experiment file at `path`; `overrides` replace whole keys of its tables (dst demo's --seed and
    --variants), before anything is checked."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExperimentConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentConfigError(f"{path}: {exc}") from None
    for table, values in (overrides or {}).items():
        raw[table] = {**raw.get(table, {}), **values} if isinstance(values, dict) else values
    for table in raw:
        if table not in TABLES:
            _fail(path, table, f"unknown table (known: {', '.join(sorted(TABLES))})")
    exp = raw.get("experiment", {})
    for key in exp:
        if key not in EXPERIMENT_KEYS:
            _fail(path, f"experiment.{key}", f"unknown setting (known: {', '.join(sorted(EXPERIMENT_KEYS))})")
    name = exp.get("name", path.stem)
    seeds = _seeds(path, exp.get("seeds", [0]))
    baselines = exp.get("baselines", [])
    if not isinstance(baselines, list) or any(b not in BASELINES for b in baselines):
        _fail(path, "experiment.baselines", f"must list modes among {BASELINES}, got {baselines!r}")
    data = _data(path, raw.get("data", {}))
    train = _train_options(path, "train", raw.get("train", {}))
    evals = _eval_options(path, "eval", raw.get("eval", {}))
    if fast:
        data, seeds, train, evals = _apply_fast(path, raw.get("fast", {}), data, seeds, train, evals)
    elif "fast" in raw:
        _apply_fast(path, raw["fast"], data, seeds, train, evals)  # checked even when not used
    cells = _cells(path, raw.get("grid", [{}]), train, evals)
    curves = exp.get("curves", False)
    if not isinstance(curves, bool):
        _fail(path, "experiment.curves", f"must be true or false, got {curves!r}")
    return ExperimentConfig(
        path,
        name,
        str(exp.get("description", "")),
        seeds,
        tuple(baselines),
        data,
        cells,
        _columns(path, raw.get("report", {})),
        fast,
        raw,
        curves,
        _comparisons(path, raw.get("compare", []), cells),
    )


def _comparisons(path: Path, tables, cells: tuple[Cell, ...]) -> tuple[tuple[str, str], ...]:
    names = [c.name for c in cells]
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        _fail(path, "compare", 'must be [[compare]] tables of a = "cell", b = "cell"')
    out = []
    for i, table in enumerate(tables):
        if set(table) != {"a", "b"} or not all(table[k] in names for k in ("a", "b")) or table["a"] == table["b"]:
            _fail(path, f"compare[{i}]", f"needs a and b, two different cells among {names}, got {table!r}")
        out.append((table["a"], table["b"]))
    return tuple(out)


def _apply_fast(path: Path, table: dict, data: dict, seeds: tuple[int, ...], train: dict, evals: dict):
    for key in table:
        if key not in ("videos", "seeds", "train", "eval"):
            _fail(path, f"fast.{key}", "unknown setting (known: videos, seeds, train, eval)")
    videos = table.get("videos", FAST_DEFAULTS["videos"])
    data = _data(path, {**data, "videos": videos})
    n_seeds = table.get("seeds", FAST_DEFAULTS["seeds"])
    if not (isinstance(n_seeds, int) and n_seeds >= 1):
        _fail(path, "fast.seeds", f"must be a number of seeds >= 1 (the first ones are kept), got {n_seeds!r}")
    train = {**train, **_train_options(path, "fast.train", table.get("train", FAST_DEFAULTS["train"]))}
    evals = {**evals, **_eval_options(path, "fast.eval", table.get("eval", {}))}
    return data, seeds[:n_seeds], train, evals


def _cells(path: Path, grids, train: dict, evals: dict) -> tuple[Cell, ...]:
    if isinstance(grids, dict):
        grids = [grids]
    if not isinstance(grids, list) or not all(isinstance(g, dict) for g in grids):
        _fail(path, "grid", "must be one or more [[grid]] tables")
    cells, seen = [], set()
    for g, grid in enumerate(grids):
        for key, values in grid.items():
            if not (isinstance(values, list) and values):
                _fail(path, f"grid[{g}].{key}", f"must be a non-empty list of values, got {values!r}")
            if key not in TRAIN_KEYS and key not in EVAL_DEFAULTS:
                reserved = " (set by the runner)" if key in TRAIN_RESERVED else ""
                _fail(path, f"grid[{g}].{key}", f"unknown setting{reserved}: not a train or eval setting")
        for combo in itertools.product(*grid.values()):
            assigned = dict(zip(grid, combo))
            key = json.dumps(assigned, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            where = f"grid[{g}] cell {Cell(0, assigned, {}, {}).name}"
            cell_train = {
                **train,
                **_train_options(path, where, {k: v for k, v in assigned.items() if k in TRAIN_KEYS}),
            }
            cell_eval = {
                **EVAL_DEFAULTS,
                **evals,
                **_eval_options(path, where, {k: v for k, v in assigned.items() if k in EVAL_DEFAULTS}),
            }
            _check_train(path, where, cell_train)
            max_seq_len = cell_train.get("max_seq_len", TrainConfig.max_seq_len)
            if cell_eval["max_context"] is not None and cell_eval["max_context"] > max_seq_len:
                _fail(
                    path,
                    where,
                    f"eval max_context {cell_eval['max_context']} exceeds the training max_seq_len "
                    f"{max_seq_len} (positions past it were never trained)",
                )
            cells.append(Cell(len(cells), assigned, cell_train, cell_eval))
    if not cells:
        _fail(path, "grid", "no cells")
    names = [c.slug for c in cells]
    if len(set(names)) != len(names):
        _fail(path, "grid", "two cells map to the same folder name; give them distinct values")
    return tuple(cells)
