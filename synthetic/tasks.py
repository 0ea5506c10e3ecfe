"""Synthetic procedural task videos in the real input formats (docs/design.md §2), made to be learnable.

`generate(out_dir, n_train, n_val, n_test)` writes `out_dir/dst/{split}.json` (records as ProAssist's generated
dialogs plus `dst`) and `out_dir/processed_data/{dataset}/frames/{video_uid}.arrow` (base64 JPEG rows at `fps`).

Why it can be learned by a tiny model whose vision encoder is random (docs/design.md §3 decides the rules):
- every step start/end is a frame boundary `m / fps`; its transition happens at decision point `m - 1`, and frame `k`
  is rendered as the scene at the END of its interval, `(k + 1) / fps`, so frame `m - 1` already shows the new step;
- a step's picture is fixed by (dataset, task, canonical step): a background hue, a large shape in a quadrant and a
  task-coloured border; idle (no step in progress) is grey with no shape. Noise, a moving square, a thin progress bar
  and rare flicker are small next to that;
- the assistant speaks exactly at transition times (instruction at each step start, feedback at some ends followed
  by idle, a final message), and answers a user question one frame after it, from templates fed by the DST state.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.frames_files import frames_file_candidates, write_frames_file

SPLITS = ("train", "val", "test")
USER_TYPES = ("no_talk", "talk_some", "talk_more")
QUESTIONS_PER_TYPE = {"no_talk": (0, 0), "talk_some": (1, 2), "talk_more": (3, 5)}  # inclusive ranges
STEP_SECONDS = (3.0, 9.0)
VIDEO_FRAMES = (40, 120)  # target length range (the lead-in, gaps and tail come on top of the steps)
GAP_PROB, FEEDBACK_PROB, SWAP_PROB, FLICKER_PROB = 0.3, 0.5, 0.25, 0.04
NOISE_SIGMA, FLICKER_LEVEL = 4.0, 12.0
IDLE_GREY = np.array([40.0, 40.0, 40.0])  # darker than every step background

# Per dataset: domain, knowledge type, visual theme (background pattern, first shape kind) and its tasks
# (goal, steps). Names are in one vocabulary per dataset so the two datasets differ in words as in pictures.
DATASETS = {
    "synth_assembly": (
        "assembly",
        "assembly steps",
        0,
        [
            (
                "assemble a toy car",
                [
                    "attach the chassis parts",
                    "attach the wheels",
                    "screw the cabin",
                    "attach the roof",
                    "fix the bumper",
                ],
            ),
            (
                "assemble a toy excavator",
                [
                    "attach the tracks",
                    "mount the cabin",
                    "attach the arm",
                    "attach the bucket",
                    "screw the arm joint",
                    "test the arm",
                ],
            ),
            (
                "build a bookshelf",
                ["lay out the side panels", "insert the dowels", "attach the shelves", "fix the back panel"],
            ),
            (
                "assemble a desk lamp",
                ["screw the base", "insert the pole", "attach the lamp head", "fit the bulb", "plug in the cable"],
            ),
            (
                "assemble a toy crane",
                [
                    "attach the base plate",
                    "mount the tower",
                    "attach the boom",
                    "thread the cable",
                    "attach the hook",
                    "attach the counterweight",
                    "test the crane",
                ],
            ),
            (
                "build a birdhouse",
                ["nail the floor", "attach the walls", "attach the roof", "drill the entrance hole", "paint the front"],
            ),
            (
                "assemble a bicycle wheel",
                ["fit the tire", "inflate the tube", "mount the wheel", "tighten the axle nuts"],
            ),
            (
                "assemble a toy truck",
                [
                    "attach the wheels",
                    "mount the trailer",
                    "attach the cabin",
                    "screw the mirrors",
                    "attach the ladder",
                    "fix the lights",
                    "attach the bumper",
                    "test the truck",
                ],
            ),
        ],
    ),
    "synth_cooking": (
        "cooking",
        "recipe steps",
        1,
        [
            (
                "make a salad",
                ["wash the lettuce", "chop the tomatoes", "slice the cucumber", "mix the dressing", "toss the salad"],
            ),
            (
                "make an omelette",
                [
                    "crack the eggs",
                    "whisk the eggs",
                    "heat the pan",
                    "pour the eggs",
                    "fold the omelette",
                    "plate the omelette",
                ],
            ),
            ("make tea", ["boil the water", "warm the teapot", "add the tea leaves", "steep the tea"]),
            (
                "make pancakes",
                [
                    "mix the flour and milk",
                    "add the eggs",
                    "whisk the batter",
                    "heat the griddle",
                    "pour the batter",
                    "flip the pancakes",
                    "serve the pancakes",
                ],
            ),
            (
                "make a sandwich",
                ["toast the bread", "spread the butter", "add the cheese", "add the ham", "cut the sandwich"],
            ),
            ("cook pasta", ["boil the water", "salt the water", "add the pasta", "drain the pasta"]),
            ("make coffee", ["grind the beans", "fill the filter", "pour the hot water"]),
            (
                "bake cookies",
                [
                    "preheat the oven",
                    "cream the butter and sugar",
                    "add the flour",
                    "shape the dough",
                    "bake the cookies",
                    "cool the cookies",
                ],
            ),
        ],
    ),
}
INSTRUCTIONS = ("Now, {step}.", "Next, please {step}.")
FIRST_INSTRUCTION = "Let's start. First, {step}."
FEEDBACK = ("Well done, you finished: {step}.", "Good job, that step is done: {step}.")
FINAL = "Great work, all steps are done. You have finished the task: {goal}."
QUESTIONS = ("What step am I on?", "What should I do next?", "How many steps are left?")


def splits(out_dir: str | Path) -> dict[str, Path]:
    """The DST JSON of each split."""
    return {split: Path(out_dir) / "dst" / f"{split}.json" for split in SPLITS}


def frames_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "processed_data"


# ---------------------------------------------------------------------------------------------- pictures


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


def step_look(dataset: str, task: int, step: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(background, shape colour, quadrant, shape kind) of a canonical step: golden-ratio hue steps and alternating
    brightness keep every pair of steps of a task far apart, also steps two apart (adjacent after a swap)."""
    theme = DATASETS[dataset][2]
    hue = 0.07 * task + 0.03 * theme + 0.382 * step
    bright = step % 2 == 0
    return (
        _rgb(hue, 0.8, 0.95 if bright else 0.6),
        _rgb(hue + 0.5, 0.9, 0.35 if bright else 1.0),
        step % 4,
        (step // 4 + theme) % 2,
    )


def task_colour(dataset: str, task: int) -> np.ndarray:
    return _rgb(task / 8 + 0.5 * DATASETS[dataset][2] / 8, 1.0, 1.0)


def render_frame(
    dataset: str,
    task: int,
    step: int | None,
    progress: float = 0.0,
    size: int = 64,
    rng: np.random.Generator | None = None,
    distractor: tuple[float, float, np.ndarray] | None = None,
    flicker: float = 0.0,
) -> np.ndarray:
    """One picture (uint8 HxWx3): the step's look (`step=None`: idle), a progress bar, a distractor square, flicker
    and pixel noise (only when `rng` is given)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # Theme pattern: assembly a vertical gradient, cooking horizontal stripes; both keep the background's hue.
    shade = 1.1 - 0.3 * yy if DATASETS[dataset][2] == 0 else np.where((yy * 8).astype(int) % 2 == 1, 1.0, 0.85)
    if step is None:
        img = IDLE_GREY * shade[..., None]
    else:
        bg, fg, quadrant, kind = step_look(dataset, task, step)
        img = bg * shade[..., None]
        cx, cy, r = (0.3 if quadrant % 2 == 0 else 0.7), (0.3 if quadrant < 2 else 0.7), 0.2
        square = np.maximum(abs(xx - cx), abs(yy - cy)) < r
        inside = square if kind == 0 else (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img[inside] = fg
    b = max(2, size // 12)
    bar = max(1, size // 32)
    if step is not None:
        img[size - b - bar : size - b, b : b + int(round(progress * (size - 2 * b)))] = 255.0
    if distractor is not None:
        x, y, colour = distractor
        side = max(2, size // 8)
        img[int(y * size) : int(y * size) + side, int(x * size) : int(x * size) + side] = colour
    img[:b], img[-b:], img[:, :b], img[:, -b:] = (task_colour(dataset, task),) * 4
    img = img + flicker
    if rng is not None:
        img = img + rng.normal(0.0, NOISE_SIGMA, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- one video


def _time(m: int, fps: float) -> float:
    """Time of frame boundary `m`, nudged up if float rounding would put `floor(fps * t)` below `m`."""
    t = m / fps
    while math.floor(fps * t) < m:
        t = math.nextafter(t, math.inf)
    return t


def _plan(rng: np.random.Generator, n_steps: int, fps: float) -> tuple[int, int, list[int], list[int], int]:
    """(k0, lead-in end, step durations, idle gaps after each step, tail), all in frames."""
    k0 = int(rng.integers(0, int(2 * fps) + 1))
    lead, tail = int(rng.integers(3, 6)), int(rng.integers(3, 7))
    lo, hi = round(STEP_SECONDS[0] * fps), round(STEP_SECONDS[1] * fps)
    # Fit the steps into VIDEO_FRAMES: few steps last longer, many steps shorter.
    lo_n = min(hi, max(lo, math.ceil((VIDEO_FRAMES[0] - lead - tail) / n_steps)))
    hi_n = max(lo_n, min(hi, (VIDEO_FRAMES[1] - 10 - lead - tail) // n_steps))
    durations = [int(rng.integers(lo_n, hi_n + 1)) for _ in range(n_steps)]
    gaps = [int(rng.integers(3, 7)) if i < n_steps - 1 and rng.random() < GAP_PROB else 0 for i in range(n_steps)]
    return k0, k0 + lead, durations, gaps, tail


def _state_text(order: list[int], names: list[str], spans: list[tuple[int, int]], m: int) -> tuple[str, str, str]:
    """Answers to QUESTIONS at boundary `m` (no transition near it), from the DST state only."""
    n = len(order)
    done = sum(end <= m for _, end in spans)
    current = next((i for i, (s, e) in enumerate(spans) if s <= m < e), None)
    upcoming = next((i for i, (s, _) in enumerate(spans) if s > m), None)
    if current is not None:
        where = f"You are on step {current + 1}: {names[current]}."
    elif upcoming is None:
        where = f"All {n} steps are done."
    else:
        where = f"No step is in progress; {done} of {n} steps are done."
    nxt = (
        "Nothing, the task is complete."
        if upcoming is None and current is None
        else "This is the last step."
        if upcoming is None
        else f"After this, {names[upcoming]}."
    )
    return where, nxt, f"Steps left: {n - done} of {n}."


def question_frames(rng: np.random.Generator, free: list[int], count_range: tuple[int, int]) -> list[int]:
    """Frames for one conversation's user questions: a count drawn from `count_range` (inclusive), taken in random
    order from the `free` frames, at least 3 frames apart."""
    lo, hi = count_range
    want, picked = int(rng.integers(lo, hi + 1)), []
    for b in rng.permutation(free).tolist():
        if len(picked) < want and all(abs(b - p) >= 3 for p in picked):
            picked.append(b)
    return picked


def make_video(dataset: str, uid: str, rng: np.random.Generator, fps: float, size: int) -> tuple[dict, list[bytes]]:
    domain, knowledge_type, _, tasks = DATASETS[dataset]
    task = int(rng.integers(len(tasks)))
    goal, canon = tasks[task]
    order = list(range(len(canon)))
    i = 0
    while i < len(order) - 1:  # varied step orders: swap some disjoint adjacent pairs
        if rng.random() < SWAP_PROB:
            order[i], order[i + 1] = order[i + 1], order[i]
            i += 1
        i += 1
    names = [canon[c] for c in order]
    k0, m, durations, gaps, tail = _plan(rng, len(order), fps)
    spans = []
    for d, g in zip(durations, gaps):
        spans.append((m, m + d))
        m += d + g
    n_frames = m + tail

    def t(b: int) -> float:
        return _time(b, fps)

    # Assistant turns at transition boundaries: instructions at starts, feedback at some ends followed by idle,
    # the final message at the last end. Their cursor anchor is the boundary, so they speak at the update points.
    said: dict[int, tuple[str, str]] = {}
    for j, (s, e) in enumerate(spans):
        said[s] = (
            (FIRST_INSTRUCTION if j == 0 else INSTRUCTIONS[int(rng.integers(2))]).format(step=names[j]),
            "initiative|instruction",
        )
        if j == len(spans) - 1:
            said[e] = (FINAL.format(goal=goal), "initiative|feedback")
        elif gaps[j] and rng.random() < FEEDBACK_PROB:
            said[e] = (FEEDBACK[int(rng.integers(2))].format(step=names[j]), "initiative|feedback")
    opening = k0 + 1
    busy = {b for span in spans for b in span} | {opening}
    # A question at boundary b (answer at b + 1) keeps 2 frames from every other turn and transition.
    free = [b for b in range(opening + 2, n_frames - 1) if all(abs(b - o) >= 2 and abs(b + 1 - o) >= 2 for o in busy)]

    def progress(b: int, state: str) -> str:
        where = _state_text(order, names, spans, b)[0]
        return (
            f"The time elapsed since the start of the task is {t(b) - k0 / fps:.1f} seconds. The user's task "
            f"goal is to {goal}; {state} {where}"
        )

    conversations = []
    for user_type in USER_TYPES:
        picked = question_frames(rng, free, QUESTIONS_PER_TYPE[user_type])
        turns = [(opening, {"role": "user", "time": t(opening), "content": f"I want to {goal}.", "labels": ""})]
        for b, (content, labels) in said.items():
            turns.append(
                (
                    b,
                    {
                        "role": "assistant",
                        "time": t(b),
                        "content": content,
                        "labels": labels,
                        "progress": progress(b, f"the assistant says: {content}"),
                    },
                )
            )
        for b in picked:
            q = int(rng.integers(len(QUESTIONS)))
            answer = _state_text(order, names, spans, b)[q]
            turns.append((b, {"role": "user", "time": t(b), "content": QUESTIONS[q], "labels": ""}))
            turns.append(
                (
                    b + 1,
                    {
                        "role": "assistant",
                        "time": t(b + 1),
                        "content": answer,
                        "labels": "responsive|info_sharing",
                        "progress": progress(b + 1, f"the user asked: {QUESTIONS[q]}"),
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

    steps_text = "".join(f"[{t(s):.1f}s-{t(e):.1f}s] {name}\n" for (s, e), name in zip(spans, names))
    record = {
        "video_uid": uid,
        "inferred_goal": goal[0].upper() + goal[1:],
        "inferred_knowledge": goal[0].upper() + goal[1:] + "".join(f"\n{j + 1}. {n}" for j, n in enumerate(names)),
        "video_labels": {},
        "conversations": conversations,
        "parsed_video_anns": {
            "dataset": dataset,
            "domain": domain,
            "knowedge_type": knowledge_type,
            "video_uid": uid,
            "goal_description": goal,
            "all_step_descriptions": steps_text,
            "clips": [[t(spans[0][0]), t(spans[-1][1]), steps_text]],
            "duration": (n_frames - k0) / fps,
            "ann_ratio": 1.0,
            "num_steps": len(names),
            "video_start_time": k0 / fps,
            "has_mistake": False,
            "num_substeps": 0,
            "fps": fps,
            "task_index": task,
            "step_order": order,
        },
        "dst": [
            {"type": "step", "id": f"S{j + 1}", "start_ts": t(s), "end_ts": t(e), "name": name}
            for j, ((s, e), name) in enumerate(zip(spans, names))
        ],
    }

    # Frame k shows the scene at boundary k + 1 (the end of its interval).
    scene: list[tuple[int | None, float]] = [(None, 0.0)] * (n_frames + 1)
    for j, (s, e) in enumerate(spans):
        for b in range(s, e):
            scene[b] = (order[j], (b - s + 1) / (e - s))
    pos, vel = rng.uniform(0.1, 0.8, 2), rng.uniform(-0.03, 0.03, 2)
    colour = rng.uniform(0, 255, 3)
    frames = []
    for k in range(n_frames):
        pos = pos + vel
        vel = np.where((pos < 0.05) | (pos > 0.82), -vel, vel)  # bounce inside the frame
        flicker = float(rng.choice([-FLICKER_LEVEL, FLICKER_LEVEL])) if rng.random() < FLICKER_PROB else 0.0
        step, prog = scene[k + 1]
        frames.append(_jpeg(render_frame(dataset, task, step, prog, size, rng, (pos[0], pos[1], colour), flicker)))
    return record, frames


# ---------------------------------------------------------------------------------------------- all splits


def generate(
    out_dir: str | Path, n_train: int, n_val: int, n_test: int, seed: int = 0, fps: float = 2.0, size: int = 64
) -> dict:
    """Write the three splits; videos alternate between the datasets. Returns a summary with paths and counts."""

    def video(split: str, split_index: int, i: int, dataset: str):
        uid = f"{split}-{dataset}-{i:04d}"  # the split in the name keeps splits disjoint
        return (uid, *make_video(dataset, uid, np.random.default_rng([seed, split_index, i]), fps, size))

    return write_splits(Path(out_dir), (n_train, n_val, n_test), video, {"fps": fps, "size": size, "seed": seed})


def write_splits(out_dir: Path, counts: tuple[int, int, int], video, settings: dict) -> dict:
    """The splits' records and frames files: `video(split, split_index, i, dataset)` makes `(uid, record, jpegs)`
    for the i-th video of a split; videos alternate between the datasets. Returns the summary (`settings` first)."""
    paths, root = splits(out_dir), frames_root(out_dir)
    summary = {"out_dir": str(out_dir), "frames_root": str(root), **settings, "datasets": list(DATASETS), "splits": {}}
    for split_index, (split, count) in enumerate(zip(SPLITS, counts)):
        records, frames, turns = [], 0, 0
        for i in range(count):
            dataset = list(DATASETS)[i % len(DATASETS)]
            uid, record, jpegs = video(split, split_index, i, dataset)
            write_frames_file(frames_file_candidates(root, dataset, uid)[0], jpegs)
            records.append(record)
            frames += len(jpegs)
            turns += sum(len(c["conversation"]) for c in record["conversations"])
        paths[split].parent.mkdir(parents=True, exist_ok=True)
        paths[split].write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
        summary["splits"][split] = {
            "json": str(paths[split]),
            "videos": count,
            "frames": frames,
            "steps": sum(len(r["dst"]) for r in records),
            "turns": turns,
        }
    return summary


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--sizes", type=int, nargs=3, default=(80, 20, 20), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    print(json.dumps(generate(args.out_dir, *args.sizes, seed=args.seed, fps=args.fps, size=args.size), indent=1))
