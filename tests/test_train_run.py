"""`dst train` end to end on the tiny model: run folder, exact resume, DDP on gloo, batch search (SIGTERM and the
SLURM recipe: test_preemption.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app
from train import run as train_run
from train.budget import search_budget
from train.build import resolve_precision
from train.config import TrainConfigError, resolve
from train.run_folder import RunFolderError

DST = str(Path(sys.executable).with_name("dst"))
BASE = {
    "model": "tiny-random",
    "batch_size": "600",
    "max_seq_len": 300,
    "num_workers": 0,
    "log_every": 1,
    "warmup_steps": 10,
    "lr": 3e-3,
    "save_every": 5,
}


def config(shards, out, **extra):
    return resolve({"shards": shards, "out": out, **BASE, **extra})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    last = run / "checkpoints" / "last"
    return {
        **load_file(str(last / "model" / "adapter_model.safetensors")),
        **load_file(str(last / "heads.safetensors")),
    }


def test_run_folder(tiny_shards, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--shards",
            str(tiny_shards),
            "--val-shards",
            str(tiny_shards),
            "--model",
            "tiny-random",
            "--out",
            str(run),
            "--max-steps",
            "6",
            "--batch-size",
            "600",
            "--max-seq-len",
            "300",
            "--num-workers",
            "2",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["max_steps"] == 6 and saved["precision"] == "fp32" and "git_commit" in saved
    assert saved["token_budget"] == 600
    lines = metrics(run)
    train_lines = [m for m in lines if "loss" in m]
    assert [m["step"] for m in train_lines] == [6]  # log_every 10 and the last step
    assert set(train_lines[0]) >= {"step", "loss", "update", "dst_text", "speak", "response", "lr", "tokens_per_s"}
    val = [m for m in lines if "val_update_f1" in m]
    assert val and set(val[0]) >= {
        "val_update",
        "val_speak",
        "val_dst_text",
        "val_response",
        "val_speak_precision",
        "val_speak_recall",
        "val_update_f1",
    }
    last = run / "checkpoints" / "last"
    assert last.resolve().name == "step-000006"
    assert {p.name for p in last.iterdir()} >= {
        "model",
        "heads.safetensors",
        "optimizer.safetensors",
        "dst.json",
        "trainer.json",
        "rng.safetensors",
    }
    assert not list(run.rglob("*.pkl")) and not list(run.rglob("*.bin")) and not list(run.rglob("*.pt"))
    with pytest.raises(RunFolderError):  # the same folder again without --resume
        train_run.run(config(tiny_shards, run, max_steps=6))


def test_resume_is_exact(tiny_shards, tmp_path):
    train_run.run(config(tiny_shards, tmp_path / "straight", max_steps=20))
    train_run.run(config(tiny_shards, tmp_path / "split", max_steps=10))
    train_run.run(config(tiny_shards, tmp_path / "split", max_steps=20, resume=True))
    straight, split = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert [m["step"] for m in split] == list(range(1, 21))
    assert split[-1]["loss"] == straight[-1]["loss"]  # exactly: same batches, RNG and optimizer state
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_ddp_matches_one_process(tiny_shards, tmp_path):
    """2 ranks x 1 micro-batch and 1 process x 2 micro-batches see the same global batch each step."""
    common = [
        DST,
        "train",
        "--shards",
        str(tiny_shards),
        "--model",
        "tiny-random",
        "--batch-size",
        "600",
        "--max-seq-len",
        "300",
        "--num-workers",
        "0",
        "--max-steps",
        "4",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        common + ["--out", str(tmp_path / "one"), "--accumulation", "2"], check=True, env=env, capture_output=True
    )
    ddp = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29531",
            "--no-python",
        ]
        + common
        + ["--out", str(tmp_path / "two")]
    )
    proc = subprocess.run(ddp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for a, b in zip(one, two):
        assert a["step"] == b["step"]
        for key in ("loss", "update", "speak", "dst_text", "response"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2


def test_batch_search_finds_the_largest_fitting_budget():
    limit_tokens = 5000
    probes = []

    def fits(tokens):
        probes.append(tokens)
        return tokens <= limit_tokens

    found = search_budget(fits, start=1024, limit=64 * 1024)
    assert limit_tokens - 64 < found <= limit_tokens
    assert len(probes) < 20
    assert search_budget(lambda t: True, start=1024, limit=8192) == 8192
    with pytest.raises(RuntimeError, match="exceed the memory limit"):
        search_budget(lambda t: False, start=1024, limit=8192)


def test_precision_and_device_errors(tiny_shards, tmp_path):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    with pytest.raises(TrainConfigError, match="needs a CUDA GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(TrainConfigError, match="needs CUDA"):
        train_run.run(config(tiny_shards, tmp_path / "q", load_in_4bit=True))
    with pytest.raises(TrainConfigError, match="precision must be one of"):
        config(tiny_shards, tmp_path / "p", precision="fp8")


def test_shipped_train_config_resolves():
    cfg = resolve({}, Path(__file__).parent.parent / "configs" / "train.toml")
    assert cfg.batch_size == "auto" and cfg.lora and cfg.decision_loss == "balanced_bce" and cfg.shards.name == "train"
