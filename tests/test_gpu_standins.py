"""The GPU-only paths of `dst train` and `dst eval`, exercised on the CPU: fp16 autocast with a GradScaler (skipped
steps, the schedule, resume), DDP with gradient accumulation (`no_sync`), a failed checkpoint save under DDP,
pinned host memory, and an fp16 stream against fp32.

A CPU has fp16 autocast and a GradScaler("cpu") but is slow at fp16 arithmetic, so the fp16 runs are a few steps
long; the two-rank runs use gloo in spawned processes (one pair for both two-rank tests: the start-up costs most).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import multiprocessing
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eval.stream import StreamConfig, Streamer
from pipeline.shard_index import ShardIndex
from train import loop as train_loop_module
from train import run as train_run
from train.batch import Batch
from train.checkpoint import load_dst_model
from train.config import resolve
from train.sequence import SequenceFormat

BASE = {
    "model": "tiny-random",
    "batch_size": "600",
    "max_seq_len": 300,
    "num_workers": 0,
    "log_every": 1,
    "warmup_steps": 10,
    "lr": 3e-3,
    "device": "cpu",
}
INIT_SCALE = 2.0**10  # small enough that the tiny model's fp16 gradients never overflow by themselves
TIMING = ("tokens_per_s", "data_s", "step_s")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from intra-op threads, and on a busy machine their spinning costs several
    times the work (the spawned ranks and the one-process run they are compared with use one thread too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    last = run / "checkpoints" / "last"
    return {
        **load_file(str(last / "model" / "adapter_model.safetensors")),
        **load_file(str(last / "heads.safetensors")),
    }


def trainer_state(run: Path) -> dict:
    return json.loads((run / "checkpoints" / "last" / "trainer.json").read_text())


# ---------------------------------------------------------------------------------------- fp16 with a GradScaler


def train_fp16(monkeypatch, shards, out: Path, max_steps: int, inf_at: int | None, resume: bool = False) -> None:
    """`dst train` under fp16 autocast on the CPU with a real GradScaler; the gradient of the update head is made
    infinite in the `inf_at`-th backward of this process (one micro-batch per step)."""
    original = train_run.build_model

    def build_model(cfg, runtime):
        model, tokenizer = original(cfg, runtime)
        calls = [0]

        def poison(grad):
            calls[0] += 1
            return grad * float("inf") if calls[0] == inf_at else grad

        model.update_head.weight.register_hook(poison)
        return model, tokenizer

    monkeypatch.setattr(train_run, "build_model", build_model)
    monkeypatch.setattr(
        train_run,
        "init_runtime",
        lambda cfg, ranks, device: train_run.Runtime(ranks.rank, ranks.world, ranks.local_rank, device, "fp16"),
    )  # resolve_precision allows fp16 on CUDA only
    monkeypatch.setattr(train_run, "build_scaler", lambda runtime: torch.amp.GradScaler("cpu", init_scale=INIT_SCALE))
    train_run.run(
        resolve({"shards": shards, "out": out, **BASE, "max_steps": max_steps, "save_every": 2, "resume": resume})
    )


@pytest.fixture(scope="module")
def fp16_runs(tiny_shards, tmp_path_factory) -> dict[str, Path]:
    """`straight`: 3 steps, step 2 skipped (inf gradient); `split`: the same, stopped after step 2 and resumed."""
    root = tmp_path_factory.mktemp("fp16")
    with pytest.MonkeyPatch.context() as mp:
        train_fp16(mp, tiny_shards, root / "straight", 3, inf_at=2)
    with pytest.MonkeyPatch.context() as mp:
        train_fp16(mp, tiny_shards, root / "split", 2, inf_at=2)
    with pytest.MonkeyPatch.context() as mp:
        train_fp16(mp, tiny_shards, root / "split", 3, inf_at=None, resume=True)
    return {"straight": root / "straight", "split": root / "split"}


def test_fp16_skipped_step_is_logged_and_holds_the_schedule(fp16_runs):
    """The skipped step halves the scale, is counted, and neither the optimizer nor the LR schedule advances."""
    lines = metrics(fp16_runs["straight"])
    assert [m["loss_scale"] for m in lines] == [INIT_SCALE, INIT_SCALE / 2, INIT_SCALE / 2]
    assert [m["skipped_steps"] for m in lines] == [0, 1, 1]
    assert [m["nonfinite_forwards"] for m in lines] == [0, 0, 0]  # the forward stayed finite
    # warmup 10 steps to 3e-3: step k (of those applied) runs at 3e-4 * k; step 3 repeats the skipped step's rate
    assert [m["lr"] for m in lines] == pytest.approx([3e-4, 6e-4, 6e-4], rel=1e-12)
    trainer = trainer_state(fp16_runs["straight"])
    assert trainer["scheduler"]["last_epoch"] == 2  # two applied steps
    optimizer = load_file(str(fp16_runs["straight"] / "checkpoints" / "last" / "optimizer.safetensors"))
    assert {float(v) for k, v in optimizer.items() if k.endswith(".step")} == {2.0}
    assert trainer["scaler"]["scale"] == INIT_SCALE / 2 and trainer["monitor"]["skipped_steps"] == 1


def test_fp16_resume_restores_the_scaler(fp16_runs):
    """Stopped after the skipped step and resumed: the scale (512, not the initial 1024), the counts and the
    weights are those of the run that went straight through."""
    split = json.loads((fp16_runs["split"] / "checkpoints" / "step-000002" / "trainer.json").read_text())
    assert split["scaler"]["scale"] == INIT_SCALE / 2
    straight, resumed = metrics(fp16_runs["straight"]), metrics(fp16_runs["split"])
    assert [{k: v for k, v in m.items() if k not in TIMING} for m in resumed] == [
        {k: v for k, v in m.items() if k not in TIMING} for m in straight
    ]
    assert trainer_state(fp16_runs["split"])["scaler"] == trainer_state(fp16_runs["straight"])["scaler"]
    a, b = weights(fp16_runs["straight"]), weights(fp16_runs["split"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ pinned memory


class RecordingLoader:
    """Stands in for torch's DataLoader: records its arguments, yields the dataset's items."""

    calls: list[dict] = []

    def __init__(self, dataset, **kwargs):
        RecordingLoader.calls.append(kwargs)
        self.dataset = dataset

    def __iter__(self):
        return iter(self.dataset)


class OneEpoch:
    def batches_for_epoch(self, epoch, start=0):
        return [f"batch {epoch}.{i}" for i in range(start, 3)]


def tiny_batch() -> Batch:
    index = torch.zeros(1, 2, dtype=torch.long)
    return Batch(
        input_ids=torch.ones(1, 4, dtype=torch.long),
        attention_mask=torch.ones(1, 4, dtype=torch.long),
        image_mask=torch.zeros(1, 4, dtype=torch.bool),
        frame_embeds=torch.zeros(0, 8, dtype=torch.float16),
        update_index=index,
        update_labels=torch.ones(1),
        update_weights=torch.ones(1),
        speak_index=index,
        speak_labels=torch.zeros(1),
        speak_weights=torch.ones(1),
        dst_index=index,
        response_index=index,
    )


def test_loader_asks_for_pinned_memory_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.utils.data, "DataLoader", RecordingLoader)
    RecordingLoader.calls = []
    for device in ("cuda", "cpu"):
        stream = train_loop_module.micro_batches(OneEpoch(), 0, 1, 0, torch.device(device))
        assert next(stream) == (0, 1, "batch 0.1")
        stream.close()
    assert [call["pin_memory"] for call in RecordingLoader.calls] == [True, False]


def test_batches_are_pinned_and_copied_without_blocking(monkeypatch):
    """The DataLoader's pinning reaches every tensor of a Batch (a plain dataclass would stay unpinned, silently),
    and `to` passes non_blocking on (a CPU-only build cannot pin: the tensor methods are recorded instead)."""
    pinned, moved = [], []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t) or t.clone())
    original_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **kw: moved.append(kw) or original_to(t, *a, **kw))
    batch = tiny_batch()
    out = torch.utils.data._utils.pin_memory.pin_memory(batch)
    n_fields = len(dataclasses.fields(Batch))
    assert isinstance(out, Batch) and len(pinned) == n_fields and out.input_ids is not batch.input_ids
    batch.to("cpu", non_blocking=True)
    assert moved == [{"non_blocking": True}] * n_fields


# --------------------------------------------------------------------------------------- two ranks on gloo (CPU)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, scenarios: list[tuple[str, dict, bool]], results: Path) -> None:
    """One of two ranks: each scenario is a `dst train` run; `fail_save`: rank 0's checkpoint writes fail as on a
    full disk. A rank that is done waits (outside torch) for the other's result before the next scenario and before
    closing the group: as under NCCL, a failed rank does not release the others by closing its connections. The
    group's timeout is short, so a rank left waiting in a collective fails the test in seconds, not an hour."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=40))
    from train import checkpoint

    try:
        for name, values, fail_save in scenarios:
            if fail_save and rank == 0:

                def full_disk(*args, **kwargs):
                    raise OSError(errno.ENOSPC, "No space left on device")

                checkpoint.save_file = full_disk
            started = time.monotonic()
            try:
                train_run.run(resolve(values))
                result = {"error": None}
            except Exception as exc:  # recorded for the test to read
                result = {"error": type(exc).__name__, "message": str(exc)}
            result["seconds"] = time.monotonic() - started
            (results / f"{name}-{rank}.json").write_text(json.dumps(result))
            other = results / f"{name}-{1 - rank}.json"
            deadline = time.monotonic() + 60
            while not other.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tiny_shards, tmp_path_factory) -> Path:
    """`ddp`: 2 steps of 2 ranks x 2 micro-batches; then `fail`: a run whose first save fails on rank 0."""
    root = tmp_path_factory.mktemp("two-ranks")
    common = {"shards": tiny_shards, **BASE, "max_steps": 2}
    scenarios = [
        ("ddp", {**common, "out": root / "ddp", "accumulation": 2}, False),
        ("fail", {**common, "out": root / "fail", "max_steps": 1}, True),
    ]
    # fork: the ranks start with the modules imported (spawn imports torch and transformers again, ~10 s on a busy
    # machine); the parent runs one intra-op thread (`one_thread`), so no OpenMP pool is forked mid-use
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, port, scenarios, root)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    return root


def test_ddp_with_accumulation_matches_one_process(two_ranks, tiny_shards):
    """2 ranks x 2 micro-batches (`no_sync` on the first) and 1 process x 4 see the same global batch per step."""
    assert [json.loads((two_ranks / f"ddp-{r}.json").read_text())["error"] for r in range(2)] == [None, None]
    train_run.run(resolve({"shards": tiny_shards, **BASE, "max_steps": 2, "out": two_ranks / "one", "accumulation": 4}))
    one, two = metrics(two_ranks / "one"), metrics(two_ranks / "ddp")
    assert [m["step"] for m in two] == [1, 2]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "update", "speak", "dst_text", "response"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    a, b = weights(two_ranks / "one"), weights(two_ranks / "ddp")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_failed_save_on_rank_0_stops_both_ranks_naming_the_checkpoint(two_ranks):
    folder = two_ranks / "fail" / "checkpoints" / "step-000001"
    rank0, rank1 = (json.loads((two_ranks / f"fail-{r}.json").read_text()) for r in range(2))
    assert rank0["error"] == rank1["error"] == "CheckpointSaveError"
    assert rank0["message"] == (
        f"could not save the checkpoint {folder}: OSError: [Errno 28] No space left on "
        "device; the last complete checkpoint is kept"
    )
    assert rank1["message"] == (
        f"rank 1: rank 0 could not save the checkpoint {folder} (its message says why); stopping every rank"
    )
    assert rank1["seconds"] < 30  # not the group's timeout (40 s here, an hour in `dst train`)
    assert sorted(p.name for p in folder.parent.iterdir()) == []  # the partial folder is removed, no `last`


# ------------------------------------------------------------------------------------------------ fp16 streaming


def test_fp16_stream_decides_as_fp32(tiny_run, tiny_shards):
    """`dst eval` on a GPU loads the checkpoint in fp16 and attends padded; on the CPU the same stream must make
    the fp32 decisions, generate the same texts and track the same states."""
    index = ShardIndex.build(tiny_shards)
    vid = index.video_ids[1]  # the shortest video
    cfg = StreamConfig(protocol="full-video", theta_update=0.3, theta_speak=0.3, max_new_tokens=6)
    frames = {}
    for dtype in (torch.float32, torch.float16):
        model, tokenizer, meta = load_dst_model(tiny_run, "cpu", dtype)
        assert model.update_head.weight.dtype == dtype
        streamer = Streamer(model, SequenceFormat(tokenizer, meta["tokens_per_frame"]), cfg)
        streamer.engine.padded = True  # the GPU's attention
        frames[dtype] = streamer.run(index.meta(vid), index.rows(vid, 0, index.num_rows(vid)), 0)["frames"]
    full, half = frames[torch.float32], frames[torch.float16]
    assert len(full) == len(half) == index.num_rows(vid)
    assert sum(bool(f["pred_text"]) for f in full) > 0 and sum(bool(f["pred_dst_delta"]) for f in full) > 0
    decisions = ("pred_dst_text", "pred_dst_delta", "pred_state", "pred_text")
    assert [[f[k] for k in decisions] for f in half] == [[f[k] for k in decisions] for f in full]
    for a, b in zip(full, half, strict=True):
        assert b["p_update"] == pytest.approx(a["p_update"], abs=2e-3)
        assert b["p_speak"] == pytest.approx(a["p_speak"], abs=2e-3)
