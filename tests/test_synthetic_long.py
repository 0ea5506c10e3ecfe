"""The long-video synthetic setting: real formats, re-seeds at its context, answers that need the history, progress
texts from the true state, and pictures that keep pauses apart from steps and idle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.frames_files import count_frames, find_frames_file
from pipeline.records import parse_record
from pipeline.timeline import COMPLETED, IN_PROGRESS, NOT_STARTED, video_labels
from synthetic import long_videos as sl
from synthetic.tasks import DATASETS, USER_TYPES

SIZES = (2, 3, 1)
FPS = 2.0


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("long")
    return out, sl.generate(out, *SIZES, seed=0, fps=FPS)


def _videos(out):
    for split, path in sl.splits(out).items():
        for i, raw in enumerate(json.loads(path.read_text())):
            record = parse_record(raw, i)
            frames = find_frames_file(sl.frames_root(out), record.dataset, record.video_uid)
            yield split, raw, record, video_labels(record, count_frames(frames), FPS)


def _state_at(raw, b: int) -> dict[str, str]:
    """The true state at frame boundary b from the DST spans (start <= b < end: in progress)."""
    state = {}
    for node in raw["dst"]:
        s, e = round(node["start_ts"] * FPS), round(node["end_ts"] * FPS)
        state[node["name"]] = COMPLETED if e <= b else IN_PROGRESS if s <= b else NOT_STARTED
    return state


def test_format_sizes_and_conversations(long_data):
    out, summary = long_data
    assert [summary["splits"][s]["videos"] for s in ("train", "val", "test")] == list(SIZES)
    assert summary["max_context"] == sl.LONG_MAX_CONTEXT == 768
    eval_types = []
    for split, raw, record, labels in _videos(out):
        assert labels.n_frames >= sl.MIN_FRAMES
        assert labels.clamped_turns == labels.dropped_turns == 0
        n = len(raw["dst"])
        assert n in (5, 6)
        # the step list is the recipe; the DST ids follow it
        task = raw["parsed_video_anns"]["task_index"]
        assert [node["name"] for node in raw["dst"]] == DATASETS[record.dataset][3][task][1]
        assert [node["id"] for node in raw["dst"]] == [f"S{j + 1}" for j in range(n)]
        assert raw["inferred_knowledge"].splitlines()[1:] == [
            f"{j + 1}. {node['name']}" for j, node in enumerate(raw["dst"])
        ]
        # the user does the steps out of order
        assert raw["parsed_video_anns"]["step_order"] != list(range(n))
        types = [c["user_type"] for c in raw["conversations"]]
        if split == "train":
            assert types == list(USER_TYPES)
        else:
            assert len(types) == 1
            eval_types += types
    assert eval_types == ["talk_more", "no_talk", "talk_some", "talk_more"]  # val 0-2, then test 0


def test_progress_and_answers_follow_the_true_state(long_data):
    out, _ = long_data
    checked = {q: 0 for q in sl.QUESTIONS}
    for _, raw, _, _ in _videos(out):
        names = [node["name"] for node in raw["dst"]]
        start = raw["parsed_video_anns"]["video_start_time"]
        for conv in raw["conversations"]:
            turns = conv["conversation"]
            for i, turn in enumerate(turns):
                if turn["role"] != "assistant":
                    continue
                b = round(turn["time"] * FPS)
                state = _state_at(raw, b)
                finished = [n for n in names if state[n] == COMPLETED]
                current = [n for n in names if state[n] == IN_PROGRESS]
                assert turn["progress"] == (
                    f"The time elapsed since the start of the task is {turn['time'] - start:.1f} seconds. The user's "
                    f"task goal is to {raw['parsed_video_anns']['goal_description']}. Finished: "
                    f"{sl._join(finished) if finished else 'nothing yet'}. Current step: "
                    f"{current[0] if current else 'none'}."
                )
                question = turns[i - 1]["content"] if turns[i - 1]["role"] == "user" else None
                if question in sl.QUESTIONS:
                    checked[question] += 1
                    before = _state_at(raw, b - 1)  # asked one frame earlier
                    todo = [n for n in names if before[n] == NOT_STARTED]
                    if question == "How many steps are left?":
                        left = sum(v != COMPLETED for v in before.values())
                        assert turn["content"] == f"Steps left: {left} of {len(names)}."
                    elif question == "What should I do next?" and todo:
                        assert turn["content"].endswith(f" {todo[0]}.")  # the recipe's first step not started
    assert all(checked.values()), checked


def test_no_instruction_is_repeated_when_a_step_resumes(long_data):
    out, _ = long_data
    resumes = 0
    for _, raw, _, _ in _videos(out):
        order = raw["parsed_video_anns"]["step_order"]
        names = [node["name"] for node in raw["dst"]]
        resume_times = {end for _, end, _ in raw["parsed_video_anns"]["pauses"]}
        resumes += len(resume_times)
        for conv in raw["conversations"]:
            said = [t for t in conv["conversation"] if t["role"] == "assistant"]
            assert not [t for t in said if t["time"] in resume_times]
            starts = [
                t["content"]
                for t in said
                if t["labels"] == "initiative|instruction,local"
                and not t["content"].startswith("Good, that step is done")
            ]
            # one instruction per step, in the order the user does them, pauses or not
            assert len(starts) == len(order)
            assert all(text.endswith(f"{names[c]}.") for text, c in zip(starts, order))
    assert resumes > 0


def test_the_next_step_after_a_gap_needs_the_history(long_data):
    """Where the user worked out of order, the step named after a gap is not the canonical successor of the step
    just finished: only a memory of what was done gives it."""
    out, _ = long_data
    differing = 0
    for _, raw, _, _ in _videos(out):
        names = [node["name"] for node in raw["dst"]]
        order = raw["parsed_video_anns"]["step_order"]
        for t in raw["conversations"][0]["conversation"]:
            if t["content"].startswith("Good, that step is done. Next, "):
                named = t["content"][len("Good, that step is done. Next, ") : -1]
                b = round(t["time"] * FPS)
                state = _state_at(raw, b)
                just_done = next(c for c in order if round(raw["dst"][c]["end_ts"] * FPS) == b)
                assert named == next(n for n in names if state[n] == NOT_STARTED)
                differing += just_done + 1 >= len(names) or names[just_done + 1] != named
    assert differing > 0


def test_pause_frames_differ_from_idle_and_steps():
    rng = np.random.default_rng(0)
    dataset = "synth_cooking"
    pause = sl.render_pause(dataset, 3, 64, rng, None, 0.0).astype(float)
    from synthetic.tasks import render_frame

    idle = render_frame(dataset, 3, None, 0.0, 64).astype(float)
    steps = [render_frame(dataset, 3, s, 0.5, 64).astype(float) for s in range(7)]
    assert np.abs(pause - idle).mean() > 30.0
    assert min(np.abs(pause - s).mean() for s in steps) > 30.0


def test_every_task_overflows_the_context_at_least_three_times():
    """A lower bound that holds for every video of the setting and every variant: each context holds the system
    prompt (at its shortest: the none variant's, no recent turns, no memory) and 8 tokens per frame, nothing else
    counted (no dialogue, no generation reserve), so a video of MIN_FRAMES frames needs more than three contexts,
    i.e. at least three re-seeds."""
    from pipeline.smolvlm import build_tiny_tokenizer
    from train.sequence import SequenceFormat

    fmt = SequenceFormat(build_tiny_tokenizer(), 5, "none")
    assert len(fmt.frame) == 8
    tasks = 0
    for dataset, (_, _, _, task_list) in DATASETS.items():
        for task in sl.long_tasks(dataset):
            goal, names = task_list[task]
            nodes = [(f"S{j + 1}", name) for j, name in enumerate(names)]
            system = len(fmt.system(goal[0].upper() + goal[1:], nodes))
            frames_per_context = (sl.LONG_MAX_CONTEXT - system) // len(fmt.frame)
            assert 3 * frames_per_context < sl.MIN_FRAMES, (goal, system, frames_per_context)
            tasks += 1
    assert tasks == 4


def test_memory_tag_boundary():
    """768 tokens hold at most 96 frame blocks of 8 tokens: an event 96 frames back is out of every context."""
    assert sl.MEMORY_HORIZON == 96 == sl.LONG_MAX_CONTEXT // sl.FRAME_TOKENS
    assert sl.memory_tag(195, 100) == "local" and sl.memory_tag(196, 100) == "memory"
    assert sl.memory_tag(10_000, None) == "local"
    assert sl.memory_tag(50, 0, horizon=50) == "memory" and sl.memory_tag(49, 0, horizon=50) == "local"


def test_every_assistant_turn_is_tagged_by_what_it_depends_on(long_data):
    """Instructions at a step's start and "What step am I on?" depend on the frame alone: local. The history
    answers, the next step after a gap and the closing feedback depend on the whole history since the first step
    started: memory exactly when they come MEMORY_HORIZON frames or more after that start."""
    out, _ = long_data
    tags = {"memory": 0, "local": 0}
    for _, raw, _, _ in _videos(out):
        first_start = min(round(node["start_ts"] * FPS) for node in raw["dst"])
        for conversation in raw["conversations"]:
            turns = conversation["conversation"]
            for i, t in enumerate(turns):
                if t["role"] != "assistant":
                    continue
                kind, tag = t["labels"].rsplit(",", 1)
                b = round(t["time"] * FPS) - 1  # the turn's frame boundary (time = (b + 1) / fps)
                asked = turns[i - 1]["content"] if turns[i - 1]["role"] == "user" else None
                frame_only = (
                    kind == "initiative|instruction"
                    and not t["content"].startswith("Good, that step")
                    or asked == "What step am I on?"
                )
                expected = "local" if frame_only else sl.memory_tag(b, first_start)
                assert tag == expected, (raw["video_uid"], t)
                tags[tag] += 1
    assert tags["memory"] > 0 and tags["local"] > 0
