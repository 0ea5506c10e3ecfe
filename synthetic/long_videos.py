"""Long synthetic task videos: several times longer than the context, with answers that need what happened before
the context overflowed (the memory study of docs/experiments.md). Same formats as the demo's videos
(`synthetic/tasks.py`, whose pictures and vocabulary this reuses), so they go through `dst prepare` as
they are.

`generate(out_dir, n_train, n_val, n_test, seed)` writes `out_dir/dst/{split}.json` and the frames files, like the
demo's generator. What is different, and why:

- Four of the demo's tasks (5-6 steps each, `LONG_TASKS`). The step list (`inferred_knowledge`, DST ids S1..Sn)
  is the recipe in its canonical order, and the user does the steps out of order: one or two steps are postponed.
  Which step comes next in the recipe then depends on which steps were already done, which no frame shows.
- Steps last 10-20 s and some are interrupted by a pause (a distinct picture: grey with a white disc in the
  middle); the step then resumes and stays `in_progress` throughout. The assistant does not repeat its instruction
  when a step resumes: only a memory of the earlier start tells a resumption from a start.
- When a step ends with an idle gap after it, the assistant names the next step of the recipe not yet started.
- Users ask "What have I finished?", "What should I do next?", "How many steps are left?" (answers from the whole
  history) and "What step am I on?" (answer visible in the frame, a control).
- Every video has at least `MIN_FRAMES` frames: at `LONG_MAX_CONTEXT` tokens its frame tokens alone fill more than
  three contexts (with the shortest system prompt), so every stream of it is re-seeded at least three times.
- `progress` (ProAssist's summary on every assistant turn) is written from the true state: elapsed time, the
  finished steps in recipe order, the current step.
- Train videos carry the three user types' conversations, as real train records do; a val or test video carries
  one (the types in turn), so the same streaming time covers three times as many videos.
- Every assistant turn's `labels` ends in a memory tag: `,memory` when its correct content depends on an event
  that no context of this setting can still hold at that turn (the turn is at least `MEMORY_HORIZON` frames after
  the event), `,local` otherwise (`memory_tag`). The answers about the history ("What have I finished?", "What
  should I do next?", "How many steps are left?"), the next step named after an idle gap and the closing
  feedback depend on the whole history, i.e. on the first step's start; a step's instruction and "What step am I
  on?" depend on what the frame shows. The silences that need memory (no repeated instruction when a step
  resumes after a pause) are not turns, so they carry no tag: repeating an instruction shows as redundant speech.

What the tiny random vision encoder can tell apart is what the demo's generator relies on: a step's picture is fixed
by (dataset, task, canonical step), idle is plain grey, and the pause picture differs from both by a large bright
disc; events sit on frame boundaries and frame k shows the scene at the end of its interval.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from synthetic.tasks import (
    DATASETS,
    FINAL,
    FIRST_INSTRUCTION,
    FLICKER_LEVEL,
    FLICKER_PROB,
    INSTRUCTIONS,
    NOISE_SIGMA,
    USER_TYPES,
    _jpeg,
    _time,
    frames_root,
    question_frames,
    render_frame,
    splits,
    write_splits,
)

__all__ = [
    "generate",
    "make_video",
    "memory_tag",
    "LONG_MAX_CONTEXT",
    "LONG_TASKS",
    "MEMORY_HORIZON",
    "MIN_FRAMES",
    "QUESTIONS",
    "splits",
    "frames_root",
]

LONG_MAX_CONTEXT = 768  # tokens: the context this setting is made for (train max_seq_len = eval max_context)
MIN_FRAMES = 260  # 130 s at 2 fps: frame tokens alone fill more than three 768-token contexts (see the tests)
# Two tasks per dataset with 5-6 steps: enough history to remember, and few enough step names for the tiny model to
# learn in the minutes a CPU gives each run (the memory, not the vocabulary, is what this setting tests).
LONG_TASKS = {
    "synth_assembly": ("assemble a toy excavator", "build a birdhouse"),
    "synth_cooking": ("make an omelette", "make a salad"),
}
STEP_FRAMES = (20, 40)  # 10-20 s per step at 2 fps
PAUSE_FRAMES = (6, 16)
GAP_FRAMES = (4, 8)
PART_MIN = 4  # frames of a step on each side of a pause
PAUSE_PROB, GAP_PROB = 0.4, 0.5
QUESTIONS_PER_TYPE = {"no_talk": (0, 0), "talk_some": (2, 4), "talk_more": (6, 9)}  # inclusive ranges
QUESTIONS = ("What have I finished?", "What should I do next?", "How many steps are left?", "What step am I on?")
NEXT_AFTER_GAP = "Good, that step is done. Next, {step}."
PAUSE_DISC = np.array([235.0, 235.0, 235.0])

# No context of this setting holds more frames than this: a frame block alone is 8 tokens at 5 tokens per frame
# (2 + 5 + 1), so 768 tokens hold at most 96 frames, and fewer beside the system prompt and the dialogue. An event
# this many frames before a turn is outside the raw context in every stream, whatever the variant and wherever the
# re-seeds fall: only the memory carried across them (DST, summary) can hold it.
FRAME_TOKENS = 8
MEMORY_HORIZON = LONG_MAX_CONTEXT // FRAME_TOKENS
MEMORY, LOCAL = "memory", "local"

EVAL_USER_TYPES = ("talk_more", "no_talk", "talk_some")  # val/test: one conversation per video, in turn
IDLE, STEP, PAUSE = "idle", "step", "pause"


def memory_tag(turn_frame: int, event_frame: int | None, horizon: int = MEMORY_HORIZON) -> str:
    """`memory` when a turn at `turn_frame` depends on an event at `event_frame` at least `horizon` frames earlier
    (None: on nothing but the current frame), `local` otherwise."""
    return MEMORY if event_frame is not None and turn_frame - event_frame >= horizon else LOCAL


def tagged(labels: str, turn_frame: int, event_frame: int | None) -> str:
    return f"{labels},{memory_tag(turn_frame, event_frame)}"


def long_tasks(dataset: str) -> list[int]:
    """Indices (in the demo's task list, so the pictures are the demo's) of the dataset's LONG_TASKS."""
    return [i for i, (goal, _) in enumerate(DATASETS[dataset][3]) if goal in LONG_TASKS[dataset]]


def render_pause(dataset: str, task: int, size: int, rng: np.random.Generator, distractor, flicker: float):
    """The pause picture: the idle scene with a large white disc in the middle, then noise."""
    img = render_frame(dataset, task, None, 0.0, size, None, distractor, flicker).astype(np.float64)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img[(xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.3**2] = PAUSE_DISC + flicker
    img = img + rng.normal(0.0, NOISE_SIGMA, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- the plan


def performed_order(rng: np.random.Generator, n: int) -> list[int]:
    """Canonical steps in the order the user does them: one or two steps postponed by at least two places."""
    order = list(range(n))
    for _ in range(int(rng.integers(1, 3))):
        i = int(rng.integers(0, n - 2))
        step = order.pop(i)
        order.insert(int(rng.integers(i + 2, n)), step)
    return order


def plan_segments(rng: np.random.Generator, order: list[int]) -> tuple[int, list[tuple[str, int | None, int]]]:
    """(k0, segments): scenes in order as (kind, canonical step or None, frames), lead-in and tail included;
    stretched so the video has at least MIN_FRAMES frames."""
    k0 = int(rng.integers(0, 5))
    durations = [int(rng.integers(STEP_FRAMES[0], STEP_FRAMES[1] + 1)) for _ in order]
    pauses = [rng.random() < PAUSE_PROB for _ in order]
    gaps = [
        int(rng.integers(GAP_FRAMES[0], GAP_FRAMES[1] + 1)) if j < len(order) - 1 and rng.random() < GAP_PROB else 0
        for j in range(len(order))
    ]
    pause_len = [int(rng.integers(PAUSE_FRAMES[0], PAUSE_FRAMES[1] + 1)) for _ in order]
    lead, tail = int(rng.integers(3, 6)), int(rng.integers(3, 7))
    total = k0 + lead + sum(durations) + sum(g for g in gaps) + sum(p for p, on in zip(pause_len, pauses) if on) + tail
    j = 0
    while total < MIN_FRAMES:  # stretch the steps one frame at a time, round robin
        durations[j % len(durations)] += 1
        total += 1
        j += 1
    segments: list[tuple[str, int | None, int]] = [(IDLE, None, k0 + lead)]
    for step, d, pause, p, gap in zip(order, durations, pauses, pause_len, gaps):
        if pause:
            first = int(rng.integers(PART_MIN, d - PART_MIN + 1))
            segments += [(STEP, step, first), (PAUSE, step, p), (STEP, step, d - first)]
        else:
            segments.append((STEP, step, d))
        if gap:
            segments.append((IDLE, None, gap))
    segments.append((IDLE, None, tail))
    return k0, segments


# ---------------------------------------------------------------------------------------------- texts


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class TrueState:
    """The task's state at a frame boundary, from the step spans (canonical index -> (first start, final end))."""

    def __init__(self, names: list[str], spans: dict[int, tuple[int, int]]):
        self.names, self.spans = names, spans

    def at(self, b: int) -> tuple[list[int], int | None, list[int]]:
        """(finished, current, not started) at boundary b, canonical order; a paused step is current."""
        finished = [c for c in range(len(self.names)) if self.spans[c][1] <= b]
        current = next((c for c in range(len(self.names)) if self.spans[c][0] <= b < self.spans[c][1]), None)
        todo = [c for c in range(len(self.names)) if self.spans[c][0] > b]
        return finished, current, todo

    def answer(self, question: int, b: int) -> str:
        finished, current, todo = self.at(b)
        n = len(self.names)
        if question == 0:
            return (
                f"You have finished: {_join([self.names[c] for c in finished])}."
                if finished
                else "You have not finished any step yet."
            )
        if question == 1:
            if current is not None:
                return (
                    f"After this, {self.names[todo[0]]}."
                    if todo
                    else f"Finish {self.names[current]}; it is the last step."
                )
            return f"Next, {self.names[todo[0]]}." if todo else "Nothing, the task is complete."
        if question == 2:
            return f"Steps left: {n - len(finished)} of {n}."
        return f"You are on: {self.names[current]}." if current is not None else "No step is in progress."

    def progress(self, b: int, elapsed: float, goal: str) -> str:
        finished, current, _ = self.at(b)
        done = _join([self.names[c] for c in finished]) if finished else "nothing yet"
        now = self.names[current] if current is not None else "none"
        return (
            f"The time elapsed since the start of the task is {elapsed:.1f} seconds. The user's task goal is to "
            f"{goal}. Finished: {done}. Current step: {now}."
        )


# ---------------------------------------------------------------------------------------------- one video


def make_video(
    dataset: str, uid: str, rng: np.random.Generator, fps: float, size: int, user_types: tuple[str, ...] = USER_TYPES
) -> tuple[dict, list[bytes]]:
    domain, knowledge_type, _, tasks = DATASETS[dataset]
    candidates = long_tasks(dataset)
    task = candidates[int(rng.integers(len(candidates)))]
    goal, names = tasks[task]
    order = performed_order(rng, len(names))
    k0, segments = plan_segments(rng, order)

    def t(b: int) -> float:
        return _time(b, fps)

    # Scenes per boundary and the step spans (first start, final end) in boundaries.
    scene: list[tuple[str, int | None, float]] = []
    spans: dict[int, list[int]] = {}
    active = {c: 0 for c in order}  # frames of a step shown so far, for its progress bar
    durations = {c: sum(n for kind, s, n in segments if kind == STEP and s == c) for c in order}
    pause_edges: set[int] = set()
    pauses: list[list] = []  # [start s, end s, step id] of each pause, for readers of the record
    b = 0
    for kind, step, n in segments:
        if kind == STEP:
            spans.setdefault(step, [b, b])[1] = b + n
        elif kind == PAUSE:
            pause_edges.update((b, b + n))
            pauses.append([_time(b, fps), _time(b + n, fps), f"S{step + 1}"])
        for _ in range(n):
            if kind == STEP:
                active[step] += 1
            scene.append((kind, step, active[step] / durations[step] if kind == STEP else 0.0))
        b += n
    n_frames = b
    state = TrueState(names, {c: (s, e) for c, (s, e) in spans.items()})

    # What a turn at boundary b depends on: the whole history (the first step's start) or the frame alone (None).
    history = spans[order[0]][0]
    said: dict[int, tuple[str, str]] = {}
    for j, c in enumerate(order):
        s, e = spans[c]
        said[s] = (
            (FIRST_INSTRUCTION if j == 0 else INSTRUCTIONS[int(rng.integers(2))]).format(step=names[c]),
            tagged("initiative|instruction", s, None),
        )
        if j == len(order) - 1:
            said[e] = (FINAL.format(goal=goal), tagged("initiative|feedback", e, history))
        elif e not in {spans[o][0] for o in order}:  # an idle gap follows: name the next step of the recipe
            said[e] = (
                NEXT_AFTER_GAP.format(step=names[state.at(e)[2][0]]),
                tagged("initiative|instruction", e, history),
            )
    opening = k0 + 1
    busy = {opening} | {x for span in spans.values() for x in span} | pause_edges
    free = [b for b in range(opening + 2, n_frames - 1) if all(abs(b - o) >= 2 and abs(b + 1 - o) >= 2 for o in busy)]

    def progress(b: int) -> str:
        return state.progress(b, t(b) - k0 / fps, goal)

    conversations = []
    for user_type in user_types:
        picked = question_frames(rng, free, QUESTIONS_PER_TYPE[user_type])
        turns = [(opening, {"role": "user", "time": t(opening), "content": f"I want to {goal}.", "labels": ""})]
        for b, (content, labels) in said.items():
            turns.append(
                (b, {"role": "assistant", "time": t(b), "content": content, "labels": labels, "progress": progress(b)})
            )
        for b in picked:
            q = int(rng.integers(len(QUESTIONS)))
            turns.append((b, {"role": "user", "time": t(b), "content": QUESTIONS[q], "labels": ""}))
            turns.append(
                (
                    b + 1,
                    {
                        "role": "assistant",
                        "time": t(b + 1),
                        "content": state.answer(q, b),
                        "labels": tagged("responsive|info_sharing", b + 1, None if q == 3 else history),
                        "progress": progress(b + 1),
                    },
                )
            )
        conversations.append(
            {
                "user_type": user_type,
                "auto_quality_eval": {},
                "conversation": [turn for _, turn in sorted(turns, key=lambda x: x[0])],
            }
        )

    steps_text = "".join(f"[{t(spans[c][0]):.1f}s-{t(spans[c][1]):.1f}s] {names[c]}\n" for c in order)
    title = goal[0].upper() + goal[1:]
    record = {
        "video_uid": uid,
        "inferred_goal": title,
        "inferred_knowledge": title + "".join(f"\n{j + 1}. {n}" for j, n in enumerate(names)),
        "video_labels": {},
        "conversations": conversations,
        "parsed_video_anns": {
            "dataset": dataset,
            "domain": domain,
            "knowedge_type": knowledge_type,
            "video_uid": uid,
            "goal_description": goal,
            "all_step_descriptions": steps_text,
            "clips": [[t(spans[order[0]][0]), t(spans[order[-1]][1]), steps_text]],
            "duration": (n_frames - k0) / fps,
            "ann_ratio": 1.0,
            "num_steps": len(names),
            "video_start_time": k0 / fps,
            "has_mistake": False,
            "num_substeps": 0,
            "fps": fps,
            "task_index": task,
            "step_order": order,
            "pauses": pauses,
            "setting": "long",
        },
        # Nodes in recipe order; the user's order shows in their times.
        "dst": [
            {"type": "step", "id": f"S{c + 1}", "start_ts": t(spans[c][0]), "end_ts": t(spans[c][1]), "name": names[c]}
            for c in range(len(names))
        ],
    }

    # Frame k shows the scene of boundary interval [k+1, k+2), i.e. the end of its own interval.
    pos, vel = rng.uniform(0.1, 0.8, 2), rng.uniform(-0.03, 0.03, 2)
    colour = rng.uniform(0, 255, 3)
    frames = []
    for k in range(n_frames):
        pos = pos + vel
        vel = np.where((pos < 0.05) | (pos > 0.82), -vel, vel)
        flicker = float(rng.choice([-FLICKER_LEVEL, FLICKER_LEVEL])) if rng.random() < FLICKER_PROB else 0.0
        kind, step, prog = scene[min(k + 1, n_frames - 1)]
        distractor = (pos[0], pos[1], colour)
        if kind == PAUSE:
            pixels = render_pause(dataset, task, size, rng, distractor, flicker)
        else:
            pixels = render_frame(dataset, task, step if kind == STEP else None, prog, size, rng, distractor, flicker)
        frames.append(_jpeg(pixels))
    return record, frames


# ---------------------------------------------------------------------------------------------- all splits


def generate(
    out_dir: str | Path, n_train: int, n_val: int, n_test: int, seed: int = 0, fps: float = 2.0, size: int = 64
) -> dict:
    """Write the three splits; videos alternate between the datasets. Returns a summary with paths and counts."""

    def video(split: str, split_index: int, i: int, dataset: str):
        uid = f"long-{split}-{dataset}-{i:04d}"
        # One conversation per val/test video (user types in turn): a long video costs minutes to stream on a
        # CPU, and one dialogue each from more videos is the better sample for the same time.
        user_types = USER_TYPES if split == "train" else (EVAL_USER_TYPES[i % len(EVAL_USER_TYPES)],)
        # stream 7 keeps these draws apart from the demo generator's [seed, split, i]
        return (uid, *make_video(dataset, uid, np.random.default_rng([seed, 7, split_index, i]), fps, size, user_types))

    return write_splits(
        Path(out_dir),
        (n_train, n_val, n_test),
        video,
        {"fps": fps, "size": size, "seed": seed, "setting": "long", "max_context": LONG_MAX_CONTEXT},
    )
