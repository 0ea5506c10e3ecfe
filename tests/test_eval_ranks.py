"""Multi-process `dst eval` under torchrun (gloo, CPU): the same files as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from eval.config import offline_sts_model
from eval.distributed import balanced_shares

DST = str(Path(sys.executable).with_name("dst"))


def test_balanced_shares_longest_first_to_the_least_loaded_rank():
    # order: 1 (9), 3 (9), 0 (5), 4 (3), 2 (1) -> rank 0 gets 1 and 0 (14), rank 1 gets 3, 4, 2 (13)
    assert balanced_shares([5, 9, 1, 9, 3], 2) == [[0, 1], [2, 3, 4]]
    assert balanced_shares([4, 4, 4], 3) == [[0], [1], [2]]
    assert balanced_shares([7], 2) == [[0], []]
    assert balanced_shares([], 2) == [[], []]


def test_torchrun_two_processes_write_what_one_writes(tiny_run, tiny_shards, tmp_path):
    """With --sweep: both passes (teacher-forced sweep, then model mode with the swept thresholds) are split over
    the ranks; rank 0 writes predictions.jsonl byte for byte as one process does, and the same metrics."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count in both runs: the same float rounding
    args = [
        "eval",
        "--ckpt",
        str(tiny_run),
        "--shards",
        str(tiny_shards),
        "--sweep",
        "--sts-model",
        offline_sts_model(),
        "--max-new-tokens",
        "6",
        "--max-context",
        "300",
    ]
    one = subprocess.run(
        [DST, *args, "--out", str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=600
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29533",
            "--no-python",
            DST,
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    lines = {name: (tmp_path / name / "predictions.jsonl").read_text().splitlines() for name in ("one", "two")}
    assert len(lines["one"]) == 8
    assert sorted(lines["two"]) == sorted(lines["one"])
    assert lines["two"] == lines["one"]  # and in the same order
    for name in ("metrics.json", "thresholds.json"):
        assert json.loads((tmp_path / "two" / name).read_text()) == json.loads((tmp_path / "one" / name).read_text())
    assert (tmp_path / "two" / "report.html").exists()
