"""Where `dst train` starts in a run folder, and how it keeps an earlier attempt's logs (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.shards import ShardFormatError
from train.run_folder import RunFolderError, StartPoint, set_aside, start_point


def checkpoint(run: Path, step: int, link: bool = True) -> Path:
    folder = run / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    (folder / "trainer.json").write_text(json.dumps({"step": step}))
    if link:
        (run / "checkpoints" / "last").symlink_to(folder.name)
    return folder


def metrics(run: Path, steps) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps))


def test_new_folder_and_resume_without_a_checkpoint_start_at_zero(tmp_path):
    assert start_point(tmp_path / "run", resume=False) == StartPoint(None)
    assert start_point(tmp_path / "run", resume=True) == StartPoint(None)


def test_an_existing_run_needs_resume(tmp_path):
    metrics(tmp_path, [1, 2])
    with pytest.raises(RunFolderError, match="already holds a run; pass --resume"):
        start_point(tmp_path, resume=False)


def test_killed_before_the_first_checkpoint_restarts_and_keeps_the_metrics(tmp_path):
    metrics(tmp_path, [1, 2, 3])
    start = start_point(tmp_path, resume=True)
    assert start == StartPoint(None, restart=True)
    (tmp_path / "metrics.jsonl.restart.1").write_text("an even earlier attempt\n")
    done = set_aside(tmp_path, start, 0)
    assert done == [
        "no checkpoint yet: starting from step 0; the earlier attempt's metrics are in metrics.jsonl.restart.2"
    ]
    assert not (tmp_path / "metrics.jsonl").exists()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl.restart.2").read_text().splitlines()] == [1, 2, 3]


def test_lines_after_the_checkpoint_are_moved_aside(tmp_path):
    folder = checkpoint(tmp_path, 2)
    metrics(tmp_path, [1, 2, 3, 4])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # cut short by a hard kill
    start = start_point(tmp_path, resume=True)
    assert start == StartPoint(folder.resolve())
    assert set_aside(tmp_path, start, 2) == [
        "3 metrics lines logged after step 2 moved to metrics.jsonl.after-step-2.1"
    ]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (tmp_path / "metrics.jsonl.after-step-2.1").read_text().splitlines()[-1] == '{"step": 5, "lo'


def test_inconsistent_checkpoint_folders_are_refused(tmp_path):
    checkpoint(tmp_path, 4, link=False)
    with pytest.raises(RunFolderError, match=r"holds step-000004 but no 'last' link: link it \(ln -s step-000004 "):
        start_point(tmp_path, resume=True)
    (tmp_path / "checkpoints" / "last").symlink_to("step-000009")
    with pytest.raises(RunFolderError, match="which is not a complete checkpoint"):
        start_point(tmp_path, resume=True)


def test_a_resumed_run_that_fails_is_not_requeued(tmp_path):
    """The job script requeues when preempted.json exists: a requeued run that then fails must not leave it."""
    from train import run as train_run
    from train.config import resolve

    run = tmp_path / "run"
    run.mkdir()
    (run / "preempted.json").write_text('{"step": 3}')
    with pytest.raises(ShardFormatError, match="does not exist"):
        train_run.run(resolve({"shards": tmp_path / "gone", "model": "tiny-random", "out": run, "resume": True}))
    assert not (run / "preempted.json").exists()
