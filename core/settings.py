"""Settings declared once: a command's frozen dataclass is the only place its options are written.

Each field is declared with `setting(default, help, **rules)`: the default, the help text and the rules (range,
choices) live in the field's metadata. From that one declaration

- `check(cfg)` refuses a value of the wrong type, out of range or not among the choices (one line, `ConfigError`,
  exit 2), whether it came from the command line, a config file or code;
- `cli.py` derives the Typer options (`options(cls)`: name, type, help with the default);
- config files are read against the same fields (`from_table`).

Why our own ~150 lines and not a library: Typer is the project's CLI and reads plain function signatures; the
libraries that derive a CLI from dataclasses (tyro, simple-parsing) replace Typer rather than feed it, and none of
them checks ranges in config files read later.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

from core.errors import InputError

MAX_FPS = 1000.0  # frames per second of a stream: far above any video, low enough that fps * time stays small


class ConfigError(InputError):
    """A missing, inconsistent or nonsensical setting; the message says which and why (exit 2)."""


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: bool = False,
    choices: tuple | None = None,
    flag: str | None = None,
    cli: bool = True,
    factory=None,
) -> Any:
    """A dataclass field with its help and rules. `above`: the minimum itself is excluded. `flag`: the Typer
    spelling of a boolean (`--lora/--full`). `cli=False`: set by config files or code only."""
    meta = {
        "help": help,
        "minimum": minimum,
        "maximum": maximum,
        "above": above,
        "choices": choices,
        "flag": flag,
        "cli": cli,
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def number_problem(
    name: str,
    value: object,
    minimum: float | None = None,
    maximum: float | None = None,
    integer: bool = False,
    above_minimum: bool = False,
) -> str | None:
    """Why `value` is not a usable `name`: not a number (or not an integer when `integer`), NaN or infinite, or
    outside [minimum, maximum] ((minimum, maximum] with `above_minimum`)."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return f"{name} must be {kind}, got {value!r}"
    if not integer and not math.isfinite(value):
        return f"{name} must be a finite number, got {value!r}"
    if minimum is not None and (value <= minimum if above_minimum else value < minimum):
        return f"{name} must be {'>' if above_minimum else '>='} {minimum:g}, got {value!r}"
    if maximum is not None and value > maximum:
        return f"{name} must be <= {maximum:g}, got {value!r}"
    return None


def fps_problem(fps: object, name: str = "fps") -> str | None:
    return number_problem(name, fps, minimum=0, maximum=MAX_FPS, above_minimum=True)


# ----------------------------------------------------------------------------------------------- types


def hints(cls) -> dict[str, Any]:
    """The resolved annotations of a dataclass (the modules use `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def _parts(tp) -> tuple:
    """The members of a union (`int | None` -> (int, NoneType)); a plain type alone."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return typing.get_args(tp)
    return (tp,)


def _type_problem(name: str, value: Any, tp) -> str | None:
    for part in _parts(tp):
        origin = typing.get_origin(part) or part
        if part is type(None) and value is None:
            return None
        if origin is bool and isinstance(value, bool):
            return None
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        if origin in (str, Path) and isinstance(value, origin):
            return None
        if origin in (tuple, dict) and isinstance(value, origin):
            return None
    kinds = [p for p in _parts(tp) if p is not type(None)]
    if kinds == [bool]:
        return f"{name} must be true or false, got {value!r}"
    if kinds == [int]:
        return f"{name} must be an integer, got {value!r}"
    if kinds == [float]:
        return f"{name} must be a number, got {value!r}"
    if kinds == [Path]:
        return f"{name} must be a path string, got {value!r}"
    if kinds == [str]:
        return f"{name} must be a string, got {value!r}"
    return f"{name} must be {' or '.join(getattr(k, '__name__', str(k)) for k in kinds)}, got {value!r}"


def problem(name: str, value: Any, tp, meta) -> str | None:
    """Why `value` is not a valid `name` of type `tp` under the rules `meta`, or None."""
    wrong = _type_problem(name, value, tp)
    if wrong or value is None:
        return wrong
    if meta.get("choices") is not None and value not in meta["choices"]:
        return f"{name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        integer = int in _parts(tp) and float not in _parts(tp)
        if meta.get("minimum") is not None or meta.get("maximum") is not None or not integer:
            return number_problem(
                name,
                value,
                meta.get("minimum"),
                meta.get("maximum"),
                integer=integer,
                above_minimum=meta.get("above", False),
            )
    return None


def check(cfg, error: type[ConfigError] = ConfigError) -> None:
    """Every declared field of `cfg` (and of the dataclasses nested in it): the first problem as `error`."""
    types_ = hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check(value, error)
        elif "help" in f.metadata:
            found = problem(f.name, value, types_[f.name], f.metadata)
            if found:
                raise error(found)


def required(cls) -> list[str]:
    return [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]


def from_table(cls, table: dict, where: str) -> dict:
    """The entries of a config-file table for `cls`: unknown keys are refused, path strings become Paths (relative
    to the file's folder is the caller's business); ranges are checked when the config is built."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown settings {unknown}")
    return dict(table)


# ----------------------------------------------------------------------------------------------- the CLI


@dataclasses.dataclass(frozen=True)
class Option:
    """One command-line option derived from a field: `--{name}` (dashes), of `type`, None when not given."""

    name: str
    type: Any  # what Typer parses: bool, int, float, str, Path, or list[...] for a repeatable option
    help: str
    flag: str | None
    path: tuple[str, ...]  # where the value goes: ("stream", "mode") for a nested config


def options(cls, prefix: tuple[str, ...] = ()) -> list[Option]:
    """The command-line options of `cls` and of the dataclasses nested in it (flattened), in field order."""
    out = []
    types_ = hints(cls)
    for f in dataclasses.fields(cls):
        tp = types_[f.name]
        if dataclasses.is_dataclass(tp):
            out += options(tp, prefix + (f.name,))
            continue
        if not f.metadata.get("cli", False):
            continue
        parts = [p for p in _parts(tp) if p is not type(None)]
        base = typing.get_origin(parts[0]) or parts[0]
        if base is tuple:
            cli_type = list[typing.get_args(parts[0])[0]]
        elif len(parts) > 1:
            cli_type = str  # e.g. `int | str` (tokens_per_frame): parsed by the config
        else:
            cli_type = base
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "" if default is None or default == () else f" (default: {_show(default)})"
        out.append(Option(f.name, cli_type, f.metadata["help"] + shown, f.metadata.get("flag"), prefix + (f.name,)))
    return out


def _show(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def nest(cls, values: dict[tuple[str, ...], Any], defaults=None):
    """Build `cls` from option values keyed by their paths (None = not given: the field's default, or `defaults`'
    value when an instance is given)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        sub = getattr(defaults, f.name, None) if defaults is not None else None
        if dataclasses.is_dataclass(hints(cls)[f.name]):
            inner = {path[1:]: v for path, v in values.items() if path[0] == f.name}
            kwargs[f.name] = nest(hints(cls)[f.name], inner, sub)
        elif values.get((f.name,)) is not None:
            kwargs[f.name] = values[(f.name,)]
        elif defaults is not None:
            kwargs[f.name] = sub
    return cls(**kwargs)
