"""A realistic one-minute record in the real input format: 20 steps, ProAssist-style dialogue, at 2 fps.

Used to measure what real text costs in tokens (tests/test_real_tokenizer.py, docs/benchmarks.md) and to feed
realistic sequences to benchmarks. The wording follows the Assembly101 example in tests/fixtures: a long goal,
step names that are full sentences, assistant turns of one to three sentences, and a few user questions.
"""

from __future__ import annotations

from pipeline.records import parse_record
from pipeline.shards import VideoMeta
from pipeline.timeline import video_labels

FPS = 2.0
SECONDS = 60.0
STEP_NAMES = [
    "Lay out the chassis parts and the screws on the table.",
    "Attach the two chassis halves together.",
    "Screw the chassis halves with the screwdriver.",
    "Attach the front left wheel to the chassis.",
    "Attach the front right wheel to the chassis.",
    "Attach the rear left wheel to the chassis.",
    "Attach the rear right wheel to the chassis.",
    "Tighten all four wheel screws.",
    "Assemble the arm from its two parts.",
    "Attach the roller to the end of the arm.",
    "Connect the arm to the chassis with the arm connector.",
    "Screw the arm connector in place.",
    "Attach the rear body to the chassis.",
    "Screw the rear body by hand.",
    "Tighten the rear body with the screwdriver.",
    "Attach the cabin to the chassis.",
    "Insert the cabin window into the cabin.",
    "Secure the cabin window with the screwdriver.",
    "Check that every screw is tight.",
    "Roll the toy to test that it works.",
]
INSTRUCTIONS = [
    "Great, let's get started! First, lay out the chassis parts and the screws so you can see everything.",
    "Now take the two chassis halves and press them together until they click.",
    "Good. Take your screwdriver and screw the chassis halves tightly so they do not move.",
    "Next, attach the front left wheel. Push it onto the axle until it sits flat against the chassis.",
    "Well done! Now do the same with the front right wheel.",
    "Let's move to the back. Attach the rear left wheel to the chassis.",
    "And now the rear right wheel. Make sure it spins freely.",
    "Tighten all four wheel screws with the screwdriver, one by one.",
    "Great progress! Now assemble the arm: fit its two parts together.",
    "Attach the roller to the end of the arm. It should turn smoothly.",
    "Now connect the arm to the chassis using the arm connector.",
    "Screw the arm connector in place so the arm stays firm.",
    "Next, take the rear body and attach it to the chassis.",
    "Screw the rear body by hand first, just enough to hold it.",
    "Now tighten the rear body with the screwdriver.",
    "Almost there! Attach the cabin to the chassis.",
    "Insert the cabin window into the cabin, with the curved side facing out.",
    "Secure the cabin window with the screwdriver.",
    "Check every screw once more and tighten any that are loose.",
    "All done! Roll the toy on the table to test that it works. Nice work!",
]
QUESTIONS = [  # (seconds, question, answer one frame later)
    (
        7.9,
        "Which screwdriver should I use for these screws?",
        "Use the small Phillips screwdriver; the screws have a cross-shaped head.",
    ),
    (
        25.6,
        "Does it matter which way the arm faces?",
        "Yes, the roller should point to the front of the toy, away from the cabin.",
    ),
    (
        47.3,
        "Is the window supposed to be this loose?",
        "It will be firm once you secure it with the screwdriver in the next step.",
    ),
]


def realistic_raw_record() -> dict:
    """The record as it appears in a DST-augmented JSON file (one `talk_more` conversation)."""
    step = SECONDS / len(STEP_NAMES)
    dst = [
        {
            "type": "step",
            "id": f"S{i + 1}",
            "start_ts": round(i * step + 0.2, 1),
            "end_ts": round((i + 1) * step - 0.1, 1),
            "name": name,
        }
        for i, name in enumerate(STEP_NAMES)
    ]
    turns = [
        {
            "role": "user",
            "time": 0.0,
            "content": "I want to assemble a toy roller with a chassis, wheels, an arm, a body and a cabin.",
        }
    ]
    turns += [{"role": "assistant", "time": node["start_ts"], "content": text} for node, text in zip(dst, INSTRUCTIONS)]
    for t, question, answer in QUESTIONS:
        turns += [
            {"role": "user", "time": t, "content": question},
            {"role": "assistant", "time": t + 0.5, "content": answer},
        ]
    turns.sort(key=lambda turn: turn["time"])
    return {
        "video_uid": "realistic_toy_roller",
        "inferred_goal": "Assembling a Toy Roller with Chassis, Wheels, Arm, Body and Cabin",
        "inferred_knowledge": "\n".join(f"{i + 1}. {name}" for i, name in enumerate(STEP_NAMES)),
        "parsed_video_anns": {"dataset": "assembly101", "video_start_time": 0.0, "duration": SECONDS},
        "dst": dst,
        "conversations": [{"user_type": "talk_more", "auto_quality_eval": {}, "conversation": turns}],
    }


def realistic_meta(tokens_per_frame: int = 5, n_frames: int = int(SECONDS * FPS)) -> dict:
    """The record's shard metadata (labels at every decision point), as `dst prepare` would store it; a smaller
    `n_frames` cuts the video short (later turns and transitions are dropped by the usual rules)."""
    labels = video_labels(parse_record(realistic_raw_record()), n_frames, FPS)
    return VideoMeta.from_labels(labels, "realistic", tokens_per_frame)
