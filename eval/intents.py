"""Speaking recall per intent of the reference turn, so a user sees which kind of turn the model misses.

A reference assistant turn's `labels` (the frame record's `ref_labels`) read `kind|intent,intent,...`, e.g.
`initiative|instruction`, `initiative|instruction,feedback`, `responsive|info_sharing`. A turn counts for every
intent it names, so one turn can count twice:

- `responsive|...` -> responsive (whatever follows);
- `initiative|...` -> instruction and/or feedback, for each of the two it names;
- anything else, including `""` (unknown) -> other.

The long synthetic videos end every assistant turn's labels with a memory tag, `,memory` or `,local`
(synthetic/long_videos.py: does its content depend on an event no context can still hold?); `memory_of` reads it.
Real ProAssist data carry no such tag: there the split is absent (None), not guessed.
"""

from __future__ import annotations

from collections import Counter

INTENTS = ("instruction", "feedback", "responsive", "other")
MEMORY_TAGS = ("memory", "local")
INITIATIVE_INTENTS = ("instruction", "feedback")


def intents_of(labels: str | None) -> tuple[str, ...]:
    kind, _, rest = (labels or "").partition("|")
    kind = kind.strip()
    if kind == "responsive":
        return ("responsive",)
    if kind == "initiative":
        named = {part.strip() for part in rest.split(",")}
        found = tuple(i for i in INITIATIVE_INTENTS if i in named)
        if found:
            return found
    return ("other",)


def memory_of(labels: str | None) -> str | None:
    """`memory` or `local` from the turn's tag; None for a turn without one."""
    tags = {part.strip() for part in (labels or "").partition("|")[2].split(",")}
    return next((t for t in MEMORY_TAGS if t in tags), None)


def intent_recall(refs: Counter, tp: Counter) -> dict:
    """Per intent: recall (TP references / references), null for an intent without references, and the counts."""
    return {
        i: {"recall": tp[i] / refs[i] if refs[i] else None, "num_ref": refs[i], "num_matched": tp[i]} for i in INTENTS
    }
