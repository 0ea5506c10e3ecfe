"""The three memories the model can carry across a full context (docs/design.md §5), as one table.

Everything else is equal between them (frames, windows, recent turns, the speaking head, the losses they share);
what differs is written here once and read by the sequence builder, the loader, the losses, streaming and the
reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.settings import ConfigError

_ROLE = "You are a proactive assistant watching the user's task video."


@dataclass(frozen=True)
class Variant:
    name: str
    tracks_state: bool  # `State:` line, decision A (update?), DST update text, re-seeds with the tracked DST
    writes_summary: bool  # `Progress:` line, the closing summary block, a generated summary on overflow
    instructions: str  # the first line of the system segment
    loss_weights: tuple[str, ...]  # the TrainConfig weights of the loss terms this variant has

    def __str__(self) -> str:
        return self.name


DST = Variant(
    "dst",
    True,
    False,
    f"{_ROLE} After each frame, track the state of every step and speak only when it helps.",
    ("w_upd", "w_dst", "w_spk", "w_rsp"),
)
SUMMARY = Variant(
    "summary", False, True, f"{_ROLE} After each frame, speak only when it helps.", ("w_spk", "w_rsp", "w_sum")
)
NONE = Variant("none", False, False, f"{_ROLE} After each frame, speak only when it helps.", ("w_spk", "w_rsp"))

VARIANTS = {v.name: v for v in (DST, SUMMARY, NONE)}
NAMES = tuple(VARIANTS)


def get_variant(name: str | Variant) -> Variant:
    if isinstance(name, Variant):
        return name
    if name not in VARIANTS:
        raise ConfigError(f"variant must be one of {', '.join(NAMES)}, got {name!r}")
    return VARIANTS[name]
