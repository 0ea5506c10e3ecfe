"""Which frames are streamed and scored (docs/design.md §8), and what the records say about how they were streamed.

- `proassist` (the default): ProAssist streams a conversation from its start to its last assistant turn and no
  further (its converter emits frames only up to each turn and drops the turns after the last assistant turn), so
  each dialogue is scored over its frames up to and including the last one with a non-empty `ref_text`. A dialogue
  without any reference is scored over zero frames (`dialogues_without_reference` in metrics.json counts them).
- `full-video`: every streamed frame, to the end of the video. A dialogue streamed under `proassist` (its record's
  `protocol`) stopped early and is refused.

`variant` ("dst" | "summary" | "none") is a property of the whole run: mixed variants are refused.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.errors import InputError
from train.variants import DST, NAMES

PROTOCOLS = ("proassist", "full-video")


class ScoringError(InputError):
    """Dialogues that cannot be scored as asked: the one-line message says why and what to do."""


def dialogue_name(d: dict) -> str:
    return f"{d.get('dataset')}/{d.get('video_uid')} conversation {d.get('conversation')}"


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ScoringError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")


def protocol_rows(spoke: Sequence[bool], protocol: str) -> int:
    """The one rule of what is streamed and scored (docs/design.md §8): how many leading rows of a dialogue whose
    assistant speaks at the rows where `spoke` is true. `full-video`: every row; `proassist`: up to and including
    the last row where the assistant spoke (0 when it never does)."""
    check_protocol(protocol)
    if protocol == "full-video":
        return len(spoke)
    return next((row + 1 for row in range(len(spoke) - 1, -1, -1) if spoke[row]), 0)


def last_reference_row(frames: list[dict]) -> int:
    """Index of the last frame with a non-empty `ref_text`; -1 when there is none."""
    return protocol_rows([bool(f["ref_text"]) for f in frames], "proassist") - 1


def cut_to_protocol(dialogues: list[dict], protocol: str) -> list[dict]:
    """The dialogues as `protocol` scores them (new dicts; the records are not modified)."""
    check_protocol(protocol)
    if protocol == "full-video":
        for d in dialogues:
            if d["protocol"] == "proassist":
                raise ScoringError(
                    f"{dialogue_name(d)} was streamed under the proassist protocol (it stops at the "
                    f"last assistant turn), so it cannot be scored as full-video; score it with "
                    f"--protocol proassist or stream it again with --protocol full-video"
                )
        return dialogues
    out = []
    for d in dialogues:
        frames = d["frames"][: protocol_rows([bool(f["ref_text"]) for f in d["frames"]], protocol)]
        last = frames[-1]["frame"] if frames else None
        reseeds = [r for r in d.get("reseeds") or [] if last is not None and r["frame"] <= last]
        out.append({**d, "frames": frames, "reseeds": reseeds})
    return out


def run_variant(dialogues: list[dict]) -> str:
    """The variant all dialogues share; refuses a mix and an unknown name."""
    found = sorted({d["variant"] for d in dialogues})
    unknown = [v for v in found if v not in NAMES]
    if unknown:
        raise ScoringError(f"unknown variant {unknown[0]!r} in the predictions (expected one of {', '.join(NAMES)})")
    if len(found) > 1:
        raise ScoringError(f"the predictions mix variants ({', '.join(found)}); score each variant's run on its own")
    return found[0] if found else DST.name
