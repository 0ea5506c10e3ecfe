"""Text the eval report shows for a dialogue: data escaped for HTML, and DST updates and states in the model's own
grammar (train/sequence.py `format_state`) with their nodes in natural order."""

from __future__ import annotations

import re
from html import escape

from train.sequence import format_state


def esc(value) -> str:
    return escape(str(value), quote=True)


def node_key(node: str):
    """Natural order: S2 before S10."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", node) if p]


def delta_text(delta: dict | None) -> str:
    """An update or state in the DST grammar, nodes in natural order."""
    return format_state(dict(sorted((delta or {}).items(), key=lambda kv: node_key(kv[0]))))
