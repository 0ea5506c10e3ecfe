"""train/fp16_monitor.py: skipped steps and non-finite forwards in metrics.jsonl, and the stop naming the layer.

A CPU cannot train in fp16, so overflow is injected: a forward hook that turns one module's output into inf, and a
real GradScaler on CPU started at a scale so large that the scaled loss overflows (gradient overflow: skipped steps).
"""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch

from pipeline.smolvlm import build_tiny_random
from train import run as train_run
from train.build import Runtime
from train.config import resolve
from train.fp16_monitor import (
    ActivationOverflow,
    TrainingMonitor,
    first_nonfinite_module,
)
from train.model import DSTModel

CPU = Runtime(rank=0, world=1, local_rank=0, device=torch.device("cpu"), precision="fp32")


def blow_up(module, inputs, output):
    return output * float("inf")


class FakeScaler:
    def __init__(self, scales):
        self.scales = list(scales)

    def get_scale(self):
        return self.scales[0]

    def update(self):
        self.scales.pop(0)


def test_skipped_steps_are_the_scale_decreases():
    scaler = FakeScaler([65536.0, 32768.0, 32768.0, 65536.0, 16384.0, 16384.0])
    monitor = TrainingMonitor(None, scaler, CPU)
    for _ in range(5):
        scaler.update()
        monitor.after_optimizer_step()
    assert monitor.metrics() == {"nonfinite_forwards": 0, "skipped_steps": 2, "loss_scale": 16384.0}
    assert TrainingMonitor(None, None, CPU).metrics() == {"nonfinite_forwards": 0}  # fp32/bf16: no scaler


@pytest.fixture(scope="module")
def tiny_batch(tiny_shards):
    from pipeline.shard_index import ShardIndex
    from train.loader import TrainData
    from train.sequence import SequenceFormat

    vlm, tokenizer = build_tiny_random()
    torch.manual_seed(0)
    model = DSTModel(vlm)
    index = ShardIndex.build(tiny_shards)
    cfg = resolve(
        {"shards": tiny_shards, "model": "tiny-random", "out": "unused", "batch_size": "600", "max_seq_len": 300}
    )
    data = TrainData.from_config(index, SequenceFormat(tokenizer, index.tokens_per_frame), cfg, 600)
    return model, next(iter(data.batches_for_epoch(0)))


def test_first_nonfinite_module_names_the_injected_layer(tiny_batch):
    model, batch = tiny_batch
    assert first_nonfinite_module(model, batch, nullcontext) is None
    handle = model.text_model.layers[1].mlp.down_proj.register_forward_hook(blow_up)
    try:
        found = first_nonfinite_module(model, batch, nullcontext)
    finally:
        handle.remove()
    assert found.module == "text_model.layers.1.mlp.down_proj" and found.layer == 1
    assert found.largest_before > 0 and found.largest_before_at.startswith("text_model.")
    assert not [m for m in model.modules() if m._forward_hooks]  # hooks are removed again


def test_monitor_counts_and_stops_with_the_layer_name(tiny_batch):
    model, batch = tiny_batch
    monitor = TrainingMonitor(model, None, CPU)
    monitor.check_forward(torch.tensor(1.5), batch, step=3, micro_batch=0)
    monitor.stop_if_overflowed()  # finite: nothing happens
    handle = model.text_model.layers[0].self_attn.o_proj.register_forward_hook(blow_up)
    try:
        monitor.check_forward(torch.tensor(float("nan")), batch, step=4, micro_batch=1)
    finally:
        handle.remove()
    assert monitor.metrics()["nonfinite_forwards"] == 1
    with pytest.raises(
        ActivationOverflow,
        match=r"step 5, micro-batch 1: .* first in "
        r"text_model\.layers\.0\.self_attn\.o_proj \(decoder layer 0\)",
    ):
        monitor.stop_if_overflowed()


def test_non_finite_loss_without_an_overflowing_activation_is_counted_not_stopped(tiny_batch):
    model, batch = tiny_batch
    monitor = TrainingMonitor(model, None, CPU)
    monitor.check_forward(torch.tensor(float("inf")), batch, step=0, micro_batch=0)
    monitor.stop_if_overflowed()
    assert monitor.metrics() == {"nonfinite_forwards": 1}


def _train(tiny_shards, out, steps, monkeypatch, scaler=None, overflow_from_step=None):
    original = train_run.build_model

    def build_model(cfg, runtime):
        model, tokenizer = original(cfg, runtime)
        if overflow_from_step is not None:
            calls = {"n": 0}

            def late_blow_up(module, inputs, output):  # finite for the first steps, then inf (one micro-batch/step)
                calls["n"] += 1
                return output * float("inf") if calls["n"] > overflow_from_step else output

            model.text_model.layers[1].mlp.register_forward_hook(late_blow_up)
        return model, tokenizer

    monkeypatch.setattr(train_run, "build_model", build_model)
    if scaler is not None:
        monkeypatch.setattr(train_run, "build_scaler", lambda runtime: scaler)
    cfg = resolve(
        {
            "shards": tiny_shards,
            "model": "tiny-random",
            "out": out,
            "max_steps": steps,
            "batch_size": "600",
            "max_seq_len": 300,
            "num_workers": 0,
            "log_every": 1,
            "lora": False,
        }
    )
    train_run.run(cfg)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dst_train_logs_gradscaler_skips(tiny_shards, tmp_path, monkeypatch):
    """A real GradScaler on CPU, started at 2**127: the scaled loss overflows, steps are skipped and the scale backs
    off until the gradients fit. The forward stays finite, so training goes on."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    _train(tiny_shards, tmp_path / "run", 6, monkeypatch, scaler=scaler)
    lines = read_metrics(tmp_path / "run")
    scales = [2.0**127] + [line["loss_scale"] for line in lines]
    decreases = sum(b < a for a, b in zip(scales, scales[1:]))
    assert decreases > 0
    assert [line["skipped_steps"] for line in lines][-1] == decreases
    assert all(line["nonfinite_forwards"] == 0 for line in lines)


def test_dst_train_stops_on_activation_overflow_naming_the_layer(tiny_shards, tmp_path, monkeypatch):
    with pytest.raises(ActivationOverflow, match=r"step 4, micro-batch 0: .*text_model\.layers\.1\.mlp"):
        _train(tiny_shards, tmp_path / "run", 8, monkeypatch, overflow_from_step=3)
    lines = read_metrics(tmp_path / "run")
    assert [line["step"] for line in lines] == [1, 2, 3]  # logged until the overflow, nothing after
    assert all(line["nonfinite_forwards"] == 0 and "skipped_steps" not in line for line in lines)
