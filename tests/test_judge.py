"""`dst judge` (eval/judge.py, eval/judge_backends.py): ProAssist's LLM judge on predictions.jsonl.

The transcripts, the parser and the aggregation on known values, the answer cache, the refusals that leave
nothing behind, and the local backend end to end through the CLI with the offline SmolLM2-135M. The HTTP backend
against a local server: tests/test_judge_http.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.judge import (
    SYSTEM_PROMPT,
    JudgeConfig,
    JudgeError,
    aggregate,
    dialogue_scores,
    judge_messages,
    parse_answer,
    run,
    transcripts,
)
from eval.judge_backends import AnswerCache
from eval.protocol import cut_to_protocol


def frame(k: int, user: str = "", ref: str = "", pred: str = "") -> dict:
    return {"frame": k, "time": (k + 1) / 2, "user_text": user, "ref_text": ref, "pred_text": pred}


def dialogue(dataset: str, uid: str, frames: list[dict]) -> dict:
    """A predictions.jsonl record streamed to the end of its video (so both protocols can judge it)."""
    return {
        "dataset": dataset,
        "video_uid": uid,
        "conversation": 0,
        "fps": 2.0,
        "variant": "dst",
        "protocol": "full-video",
        "frames": frames,
    }


# The stream of "truck" starts at frame 4 of its video: ProAssist's timestamps count from the stream's start.
TRUCK = dialogue(
    "wtag",
    "truck",
    [
        frame(4, user="I want to build the truck."),
        frame(5, ref="Attach the wheels."),
        frame(6, pred="Attach the wheels now."),
        frame(7, user="Done, what next?", ref="Mount the cabin.", pred="Mount the cabin."),
        frame(8),
        frame(9, ref="Well done, you finished."),
        frame(10, user="Thanks!", pred="You are welcome."),
        frame(11),
    ],
)
CAKE = dialogue(
    "ego4d",
    "cake",
    [
        frame(0, user="How do I bake a cake?", ref="Preheat the oven.", pred="Preheat the oven."),
        frame(1, ref="Mix the flour.", pred="Stir."),
    ],
)
SILENT = dialogue("ego4d", "silent", [frame(0, user="hello", pred="Hi there.")])  # no reference turn at all

TRUCK_GOLD = (
    "[0.5s] User: I want to build the truck.\n"
    "[1.0s] Assistant: Attach the wheels.\n"
    "[2.0s] User: Done, what next?\n"
    "[2.0s] Assistant: Mount the cabin.\n"
    "[3.0s] Assistant: Well done, you finished.\n"
)
TRUCK_GENERATED = (
    "[0.5s] User: I want to build the truck.\n"
    "[1.5s] Assistant: Attach the wheels now.\n"
    "[2.0s] User: Done, what next?\n"
    "[2.0s] Assistant: Mount the cabin.\n"
)


def write_predictions(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_transcripts_exact_text():
    truck, cake = cut_to_protocol([TRUCK, CAKE], "proassist")
    assert transcripts(truck) == (TRUCK_GOLD, TRUCK_GENERATED)  # the thanks after the last reference is cut
    assert transcripts(cake) == (
        "[0.5s] User: How do I bake a cake?\n[0.5s] Assistant: Preheat the oven.\n[1.0s] Assistant: Mix the flour.\n",
        "[0.5s] User: How do I bake a cake?\n[0.5s] Assistant: Preheat the oven.\n[1.0s] Assistant: Stir.\n",
    )
    (full,) = cut_to_protocol([TRUCK], "full-video")
    assert transcripts(full) == (
        TRUCK_GOLD + "[3.5s] User: Thanks!\n",
        TRUCK_GENERATED + "[3.5s] User: Thanks!\n[3.5s] Assistant: You are welcome.\n",
    )
    system, user = judge_messages(*transcripts(truck))
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    assert user["role"] == "user" and user["content"] == (
        "Gold-standard reference dialogue:\n"
        + TRUCK_GOLD
        + "\n\nGenerated dialogue by the model:\n"
        + TRUCK_GENERATED
        + "\n\nFormat your answer as follows:\n<your step-by-step comparison and concise analysis>"
        '\n---\n{"correctness": x, "promptness": y, "efficiency": z, "overall": w}\n'
    )


def s(c, p, e, o) -> dict:
    return {"correctness": c, "promptness": p, "efficiency": e, "overall": o}


FOUR = {"correctness": 4, "promptness": 3, "efficiency": 5, "overall": 2}


@pytest.mark.parametrize(
    "answer, expected",
    [
        ('The timing is off.\n---\n{"correctness": 4, "promptness": 3, "efficiency": 5, "overall": 2}', (FOUR, None)),
        ('{"correctness": 4, "promptness": 3, "efficiency": 5, "overall": 2} is my rating', (FOUR, None)),  # no ---
        (
            '---\n{"correctness": 4.5, "promptness": 1, "efficiency": 5, "overall": 1} trailing',
            ({"correctness": 4.5, "promptness": 1, "efficiency": 5, "overall": 1}, None),
        ),
        (
            '{"correctness": 1, "promptness": 1, "efficiency": 1, "overall": 1}\n---\n'  # after --- only
            '{"correctness": 4, "promptness": 3, "efficiency": 5, "overall": 2}',
            (FOUR, None),
        ),
        ("I cannot rate these dialogues.", (None, "no_json_object")),
        ("analysis\n---\nno scores here", (None, "no_json_object")),
        (
            'a\n---\nb\n---\n{"correctness": 4, "promptness": 3, "efficiency": 5, "overall": 2}',
            (None, "no_json_object"),
        ),  # ProAssist reads between the first two ---
        ('---\n{\n"correctness": 4, "promptness": 3, "efficiency": 5, "overall": 2}', (None, "no_json_object")),
        ("---\n{correctness: 4, promptness: 3}", (None, "malformed_json")),
        ('---\n{"correctness": 4, "promptness": 3, "efficiency": 5}', (None, "missing_score")),
        ('---\n{"correctness": 6, "promptness": 3, "efficiency": 5, "overall": 2}', (None, "out_of_range")),
        ('---\n{"correctness": 4, "promptness": 0, "efficiency": 5, "overall": 2}', (None, "out_of_range")),
        ('---\n{"correctness": "4", "promptness": 3, "efficiency": 5, "overall": 2}', (None, "not_a_number")),
        ('---\n{"correctness": true, "promptness": 3, "efficiency": 5, "overall": 2}', (None, "not_a_number")),
        ('---\n{"correctness": NaN, "promptness": 3, "efficiency": 5, "overall": 2}', (None, "not_a_number")),
    ],
)
def test_parse_answer(answer, expected):
    assert parse_answer(answer) == expected


def test_aggregation_on_known_numbers():
    assert dialogue_scores([]) is None
    assert dialogue_scores([FOUR, {"correctness": 2, "promptness": 5, "efficiency": 1, "overall": 4}]) == {
        "correctness": 3.0,
        "promptness": 4.0,
        "efficiency": 3.0,
        "overall": 3.0,
    }
    rows = [
        {"dataset": "wtag", "scores": s(2, 2, 2, 2), "valid": 3, "skipped": 0},
        {"dataset": "wtag", "scores": s(5, 4, 3, 2), "valid": 1, "skipped": 2},  # a dialogue weighs 1, not 1/4
        {"dataset": "wtag", "scores": None, "valid": 0, "skipped": 3},  # no valid sample: not in the mean
        {"dataset": "ego4d", "scores": s(4, 4, 4, 5), "valid": 3, "skipped": 0},
    ]
    out = aggregate(rows)
    assert out["datasets"] == {
        "ego4d": {
            **s(4.0, 4.0, 4.0, 5.0),
            "dialogues": 1,
            "dialogues_scored": 1,
            "valid_samples": 3,
            "skipped_samples": 0,
        },
        "wtag": {
            **s(3.5, 3.0, 2.5, 2.0),
            "dialogues": 3,
            "dialogues_scored": 2,
            "valid_samples": 4,
            "skipped_samples": 5,
        },
    }
    assert out["mean"] == s(3.75, 3.5, 3.25, 3.5)  # unweighted over datasets
    lost = aggregate(rows + [{"dataset": "holoassist", "scores": None, "valid": 0, "skipped": 3}])
    assert lost["datasets"]["holoassist"]["correctness"] is None and lost["mean"] == s(None, None, None, None)


def test_empty_predictions_writes_nothing(tmp_path):
    empty = tmp_path / "predictions.jsonl"
    empty.write_text("\n")
    cfg = JudgeConfig(predictions=empty, out=tmp_path / "eval", judge_model="smollm2-135m")
    with pytest.raises(JudgeError, match=r"predictions\.jsonl: no dialogue records \(empty file\)"):
        run(cfg)
    assert not cfg.out.exists()


def test_cache_drops_a_line_cut_by_a_kill_and_refuses_a_damaged_one(tmp_path):
    path = tmp_path / "judge_cache.jsonl"
    path.write_text('{"key": "a", "dialogue": "d", "sample": 0, "text": "one"}\n{"key": "b", "dialo')
    cache = AnswerCache(path)
    assert cache.answers == {"a": "one"}
    cache.add("c", "three", "d", 2)
    cache.close()
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "c"]
    path.write_text('{"key": "a", "text": "one"}\nnot json\n{"key": "c", "text": "three"}\n')
    with pytest.raises(JudgeError, match=r"judge_cache\.jsonl line 2: not a cached answer"):
        AnswerCache(path)


# ----------------------------------------------------------------------------------------------- the CLI


def cli(*args: str):
    from typer.testing import CliRunner

    from cli import app

    return CliRunner().invoke(app, ["judge", *args])


# ----------------------------------------------------------------------------------------------- local


@pytest.fixture
def one_thread():
    """One CPU thread: on a shared machine torch's default threads wait on each other (ten times slower here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_local_smollm2_through_the_cli(tmp_path, one_thread):
    """`dst judge --judge-model smollm2-135m` on two dialogues: the offline SmolLM2-135M as a smoke-test judge. It
    rarely writes the score object, so the bookkeeping is asserted (valid + skipped = n per dialogue, settings
    recorded); a resumed run draws only the missing sample, and draws the same answer (per-sample seeds)."""
    predictions = write_predictions(tmp_path / "predictions.jsonl", [TRUCK, CAKE])
    out = tmp_path / "eval"
    result = cli(
        "--predictions",
        str(predictions),
        "--judge-model",
        "smollm2-135m",
        "--out",
        str(out),
        "--max-tokens",
        "8",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    judge = json.loads((out / "judge.json").read_text())
    assert judge["judge"] == {"model": "smollm2-135m", "backend": "local", "url": None}
    assert (judge["settings"]["max_tokens"], judge["settings"]["seed"], judge["settings"]["n"]) == (8, 0, 3)
    assert judge["samples"]["requested"] == 6 and judge["samples"]["from_cache"] == 0
    assert judge["samples"]["valid"] + judge["samples"]["skipped"] == 6
    assert sum(judge["samples"]["skipped_by_reason"].values()) == judge["samples"]["skipped"]
    assert [(r["dialogue"], r["valid"] + r["skipped"]) for r in judge["dialogues"]] == [
        ("wtag/truck conversation 0", 3),
        ("ego4d/cake conversation 0", 3),
    ]
    lines = (out / "judge_cache.jsonl").read_text().splitlines()
    cached = [json.loads(line) for line in lines]
    assert sorted((c["dialogue"], c["sample"]) for c in cached) == sorted(
        (d, i) for d in ("wtag/truck conversation 0", "ego4d/cake conversation 0") for i in range(3)
    )
    assert all(c["text"] for c in cached)

    (out / "judge_cache.jsonl").write_text("\n".join(lines[:4] + lines[5:]) + "\n")  # as if killed before one
    cfg = JudgeConfig(predictions=predictions, out=out, judge_model="smollm2-135m", max_tokens=8, device="cpu")
    again = run(cfg)
    assert again["samples"]["from_cache"] == 5 and again["dialogues"] == judge["dialogues"]
    assert json.loads((out / "judge_cache.jsonl").read_text().splitlines()[-1]) == cached[4]
