"""Checks of numeric settings (command-line options and config files), shared by every command.

Each check returns the one-line problem, or None: a caller raises its own config error with it, so the command
exits 2 with that line before it reads or writes anything.
"""

from __future__ import annotations

import math

MAX_FPS = 1000.0  # frames per second of a stream: far above any video, low enough that fps * time stays small


class ConfigError(ValueError):
    """A missing, inconsistent or nonsensical setting; the message says which and why (exit 2)."""


def number_problem(name: str, value: object, minimum: float | None = None, maximum: float | None = None,
                   integer: bool = False, above_minimum: bool = False) -> str | None:
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
