"""One device rule for `dst prepare`, `dst train` and `dst eval` (core/runtime.py choose_device), checked on CPU: the
CUDA and process-group calls are faked, and each command's own entry point runs up to where it hands its device on,
so a command that picked its device another way would fail here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.errors import InputError
from eval import evaluate
from eval.config import EvalConfig
from pipeline import prepare
from pipeline.config import PrepareConfig
from train import run as train_run
from train.config import TrainConfig

TORCHRUN_RANK_1 = {
    "RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
}


@pytest.fixture
def two_gpus(monkeypatch):
    """Rank 1 of 2 under torchrun on a machine with two (fake) Turing GPUs; records what the commands ask of CUDA."""
    calls = {"set_device": [], "capability": [], "groups": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(torch.device(d)))

    def capability(device=None):
        calls["capability"].append(torch.device(device))
        return (7, 5)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda backend, **kwargs: calls["groups"].append(backend)
    )
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: None)
    for key, value in TORCHRUN_RANK_1.items():
        monkeypatch.setenv(key, value)
    return calls


def _handed_on(module, monkeypatch) -> list:
    """Replace the command's work (`_run`) by a recorder of the arguments it is handed."""
    seen: list = []
    monkeypatch.setattr(module, "_run", lambda *args, **kwargs: seen.extend([*args, *kwargs.values()]))
    return seen


def _device_of(seen: list) -> torch.device:
    devices = [a for a in seen if isinstance(a, torch.device)]
    devices += [a.device for a in seen if isinstance(getattr(a, "device", None), torch.device)]  # train's Runtime
    assert len(devices) == 1, f"the command handed on no single device: {seen}"
    return devices[0]


def _prepare(device: str, tmp: Path):
    return prepare.run(
        PrepareConfig(
            split="train", dst_json=(tmp / "train.json",), model="tiny-random", out=tmp / "shards", device=device
        )
    )


def _train(device: str, tmp: Path):
    return train_run.run(TrainConfig(shards=tmp / "shards", model="tiny-random", out=tmp / "run", device=device))


def _eval(device: str, tmp: Path):
    return evaluate.run(EvalConfig(shards=tmp / "shards", out=tmp / "eval", device=device))


COMMANDS = {
    "prepare": (prepare, _prepare, "gloo"),
    "train": (train_run, _train, "nccl"),
    "eval": (evaluate, _eval, "gloo"),
}


@pytest.mark.parametrize("requested", ["auto", "cuda"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_rank_1_of_torchrun_takes_its_local_gpu(two_gpus, monkeypatch, tmp_path, command, requested):
    module, call, backend = COMMANDS[command]
    seen = _handed_on(module, monkeypatch)
    call(requested, tmp_path)
    assert _device_of(seen) == torch.device("cuda", 1)
    assert two_gpus["set_device"] == [torch.device("cuda", 1)]
    assert two_gpus["groups"] == [backend]  # train all-reduces gradients over NCCL; the others meet over gloo
    if command == "train":
        runtime = next(a for a in seen if isinstance(a, train_run.Runtime))
        assert (runtime.rank, runtime.world, runtime.local_rank, runtime.precision) == (1, 2, 1, "fp16")
        assert two_gpus["capability"] == [torch.device("cuda", 1)]  # precision is chosen for the rank's own GPU


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_explicit_gpu_index_wins_over_the_local_rank(two_gpus, monkeypatch, tmp_path, command):
    module, call, _ = COMMANDS[command]
    seen = _handed_on(module, monkeypatch)
    call("cuda:0", tmp_path)
    assert _device_of(seen) == torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("requested", "message"),
    [
        ("gpu", "'gpu' is not a device"),
        ("mps", "only cpu and cuda are supported"),
        ("cuda:2", "GPU 2 requested .local rank 1., but only 2 visible"),
    ],
)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_device_that_cannot_be_used_is_an_input_error(two_gpus, monkeypatch, tmp_path, command, requested, message):
    module, call, _ = COMMANDS[command]
    seen = _handed_on(module, monkeypatch)
    with pytest.raises(InputError, match=message):
        call(requested, tmp_path)
    assert seen == [] and two_gpus["set_device"] == [] and two_gpus["groups"] == []


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cuda_without_a_gpu_says_so_and_auto_falls_back_to_cpu(monkeypatch, tmp_path, command):
    module, call, _ = COMMANDS[command]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for key in TORCHRUN_RANK_1:
        monkeypatch.delenv(key, raising=False)
    seen = _handed_on(module, monkeypatch)
    with pytest.raises(InputError, match="no CUDA GPU is visible to this process; use --device cpu"):
        call("cuda", tmp_path)
    call("auto", tmp_path)
    assert _device_of(seen) == torch.device("cpu")
