"""Shared test helpers: fixture paths and small frames files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.frames_files import (
    frames_file_candidates,
    synthetic_jpegs,
    write_frames_file,
)

FIXTURES = Path(__file__).parent / "fixtures"
EXAMPLE_JSON = FIXTURES / "dst_record_example.json"
PROASSIST_JSONL = FIXTURES / "proassist_prepared_data.jsonl"


def write_dummy_frames(root: Path, dataset: str, video_uid: str, n_frames: int) -> Path:
    """A frames file of `n_frames` rows in ProAssist's layout. Label tests never decode pictures, so the rows hold
    a few placeholder bytes; tests that decode use `synthetic_jpegs`."""
    path = frames_file_candidates(root, dataset, video_uid)[0]
    write_frames_file(path, [b"frame%d" % k for k in range(n_frames)])
    return path


def write_records(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def example_record() -> dict:
    return json.loads(EXAMPLE_JSON.read_text())[0]


# Small videos for the training tests: (uid, dataset, start time, frames, turns).
TINY_VIDEOS = (
    ("vid-a", "wtag", 1.0, 30, 6),
    ("vid-b", "ego4d", 0.0, 18, 5),
    ("vid-c", "wtag", 2.0, 26, 7),
    ("vid-d", "ego4d", 0.5, 24, 4),
)


def tiny_record(uid: str, dataset: str, start: float, n_turns: int) -> dict:
    turns = [
        {
            "role": "assistant" if j % 2 else "user",
            "time": start + 0.7 + 1.9 * j,
            "content": ["please open the lid", "now turn the screw", "hold the board"][j % 3],
        }
        for j in range(n_turns)
    ]
    for j, turn in enumerate(turns):
        if turn["role"] == "assistant":  # ProAssist's fields of assistant turns (progress: the summary variant)
            turn["labels"] = ["initiative|instruction", "responsive|qa", "initiative|instruction,feedback"][j % 3]
            turn["progress"] = f"After {1.9 * j:.1f} seconds the user has done {j // 2} steps of the toy."
    return {
        "video_uid": uid,
        "inferred_goal": "assemble the toy",
        "inferred_knowledge": "1. a\n2. b\n3. c",
        "parsed_video_anns": {"dataset": dataset, "video_start_time": start, "duration": 15.0},
        "dst": [
            {"type": "step", "id": "S1", "start_ts": start + 1.0, "end_ts": start + 4.0, "name": "open"},
            {"type": "step", "id": "S2", "start_ts": start + 4.0, "end_ts": start + 9.0, "name": "screw"},
            {"type": "step", "id": "S3", "start_ts": start + 9.0, "end_ts": start + 12.0, "name": "hold"},
        ],
        "conversations": [
            {"user_type": "talk_some", "conversation": turns},
            {"user_type": "no_talk", "conversation": turns[1:2]},
        ],
    }


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Shards of TINY_VIDEOS prepared with the tiny model (5 tokens per frame, several shards)."""
    from pipeline import prepare
    from pipeline.config import PrepareConfig

    tmp = tmp_path_factory.mktemp("tiny-shards")
    for i, (uid, dataset, _, n, _) in enumerate(TINY_VIDEOS):
        write_frames_file(frames_file_candidates(tmp / "frames", dataset, uid)[0], synthetic_jpegs(n, 32, seed=i))
    dst_json = write_records(tmp / "train.json", [tiny_record(u, d, s, t) for u, d, s, _, t in TINY_VIDEOS])
    prepare.run(
        PrepareConfig(
            split="train",
            dst_json=(dst_json,),
            model="tiny-random",
            out=tmp / "out",
            frames_root=tmp / "frames",
            tokens_per_frame=5,
            shard_size_mb=0.02,
        )
    )
    return tmp / "out"


@pytest.fixture(scope="session")
def tiny_run(tiny_shards, tmp_path_factory) -> Path:
    """A short LoRA run of the tiny model on tiny_shards; its checkpoint folder."""
    from train import run as train_run
    from train.config import resolve

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    train_run.run(
        resolve(
            {
                "shards": tiny_shards,
                "model": "tiny-random",
                "out": out,
                "max_steps": 8,
                "batch_size": "600",
                "max_seq_len": 300,
                "num_workers": 0,
                "lr": 3e-3,
            }
        )
    )
    return out / "checkpoints" / "last"


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of `smollm2-135m`: the real SmolLM2-135M-Instruct in a SmolVLM2-256M shape. The first run
    on a machine converts the GGUF once (about 30 s) into the user's cache; later runs load it in about a second."""
    from pipeline.models import load_model

    return load_model("smollm2-135m")
