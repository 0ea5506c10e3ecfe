"""The token budget (train/budget.py) on CPU: never below the longest window, probes shaped like the real packed
batches, the memory arithmetic with a fake reader, and out-of-memory errors that end in one line of advice."""

from __future__ import annotations

import pytest
import torch

from core.errors import DataError
from pipeline.shard_index import ShardIndex
from pipeline.smolvlm import build_tiny_tokenizer
from train.budget import (
    CONTEXT_BYTES,
    DDP_BYTES_PER_PARAM,
    NCCL_BYTES,
    OPTIMIZER_BYTES_PER_PARAM,
    memory_advice,
    memory_fits,
    probe_batch,
    probe_shape,
    resolve_token_budget,
    run_peak,
    search_budget,
)
from train.build import Runtime, build_model
from train.config import TrainConfigError, resolve
from train.loader import TrainData, collate
from train.sequence import SequenceFormat

CPU = Runtime(0, 1, 0, torch.device("cpu"), "fp32")
GIB = 2**30


def config(**extra):
    return resolve({"shards": "unused", "model": "tiny-random", "out": "unused", **extra})


def test_a_fixed_budget_below_the_longest_window_is_refused():
    with pytest.raises(
        TrainConfigError,
        match=r"--batch-size 600 is below the longest window \(1500 tokens.*"
        r"raise --batch-size to at least 1500 or lower --max-seq-len",
    ):
        resolve_token_budget(config(batch_size="600", max_seq_len=1500), CPU, None, None, None)
    with pytest.raises(TrainConfigError, match=r"below the longest window \(800 tokens"):  # the curriculum's
        resolve_token_budget(
            config(batch_size="600", max_seq_len=300, curriculum_steps=5, curriculum_max_seq_len=800),
            CPU,
            None,
            None,
            None,
        )
    assert resolve_token_budget(config(batch_size="600", max_seq_len=600), CPU, None, None, None) == 600
    assert resolve_token_budget(config(max_seq_len=300), CPU, None, None, None) == 4096  # auto on CPU
    assert resolve_token_budget(config(max_seq_len=5000), CPU, None, None, None) == 5000


def test_the_search_moves_in_whole_windows():
    assert search_budget(lambda t: t <= 1000, start=300, limit=64 * 300, unit=300) == 900
    with pytest.raises(DataError, match="even 1500 tokens per micro-batch exceed the memory limit"):
        search_budget(lambda t: t <= 600, start=1500, limit=64 * 1500, unit=1500)


@pytest.mark.parametrize("variant", ["dst", "summary"])
def test_the_probe_is_at_least_as_heavy_as_every_packed_batch(tiny_shards, variant):
    index = ShardIndex.build(tiny_shards)
    fmt = SequenceFormat(build_tiny_tokenizer(), index.tokens_per_frame, variant)
    shape = probe_shape(index, fmt, 300)
    for budget in (300, 900):
        data = TrainData(index, fmt, max_seq_len=300, max_tokens=budget, seed=3)
        batches = [collate(index, fmt, windows, 0) for e in (0, 1) for windows in data.rank_batches(e)]
        probe = probe_batch(shape, budget, fmt, index.hidden_size, "cpu")

        def lm_share(b):
            return (len(b.dst_index) + len(b.response_index) + len(b.summary_index)) / b.input_ids.numel()

        real = max(lm_share(b) for b in batches)
        assert real > 0.0625  # the old fixed probe's share: real batches carry more targets
        assert lm_share(probe) >= real
        assert probe.input_ids.shape[1] == 300 >= max(b.input_ids.shape[1] for b in batches)
        assert probe.input_ids.numel() >= budget >= max(b.input_ids.numel() for b in batches)
        assert int(probe.image_mask.sum()) / probe.input_ids.numel() >= max(
            int(b.image_mask.sum()) / b.input_ids.numel() for b in batches
        )
        assert probe.frame_embeds.shape == (int(probe.image_mask.sum()), index.hidden_size)
    assert probe.attention_mask[-1, -1] == 0 and int(probe.attention_mask.sum()) == 3 * 300 - 1  # masked path


def test_run_peak_counts_what_the_run_adds():
    trainable = 1000
    one = run_peak(5 * GIB, trainable, world=1)
    assert one == 5 * GIB + OPTIMIZER_BYTES_PER_PARAM * trainable + CONTEXT_BYTES
    assert run_peak(5 * GIB, trainable, world=2) == one + DDP_BYTES_PER_PARAM * trainable + NCCL_BYTES


class FakeMemory:
    """A card of `total` bytes whose peak reserved memory is `per_token` bytes per probe token (seen through a
    forward pre-hook) or given by `peaks`."""

    def __init__(self, total: int, per_token: int = 0, model=None):
        self._total, self.per_token, self.tokens, self.resets, self.seen = total, per_token, 0, 0, []
        if model is not None:
            model.register_forward_pre_hook(self._see)

    def _see(self, module, args):
        self.tokens = args[0].input_ids.numel()
        self.seen.append(self.tokens)

    def total(self) -> int:
        return self._total

    def peak_reserved(self) -> int:
        return self.per_token * self.tokens

    def reset(self) -> None:
        self.tokens, self.resets = 0, self.resets + 1


def test_memory_fits_compares_the_run_peak_with_the_fraction():
    trainable, world = 10**6, 2
    extra = run_peak(0, trainable, world)
    memory = FakeMemory(total=10 * GIB, per_token=GIB // 1000)
    fits = memory_fits(lambda tokens: setattr(memory, "tokens", tokens), memory, 0.9, trainable, world)
    boundary = (9 * GIB - extra) // (GIB // 1000)  # the most tokens whose run peak is <= 90% of 10 GiB
    assert fits(boundary) and not fits(boundary + 1)
    assert memory.resets == 2  # every probe starts from a reset peak
    single = memory_fits(lambda tokens: setattr(memory, "tokens", tokens), memory, 0.9, trainable, 1)
    assert single(boundary + 1)  # without DDP's buckets and NCCL more fits


def test_the_search_runs_real_probes_and_picks_whole_windows(tiny_shards):
    cfg = config(max_seq_len=300)
    model, tokenizer = build_model(cfg, CPU)
    index = ShardIndex.build(tiny_shards)
    fmt = SequenceFormat(tokenizer, index.tokens_per_frame, cfg.variant)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_token = 2**20
    total = int((750 * per_token + run_peak(0, trainable, 1)) / 0.9)  # 750 probe tokens fit, 900 do not
    memory = FakeMemory(total, per_token, model)
    assert resolve_token_budget(cfg, CPU, model, fmt, index, memory) == 600
    assert memory.seen == [300, 600, 1200, 900]
    assert all(p.grad is None for p in model.parameters())  # the probes leave no gradients behind
    small = FakeMemory(int(250 * per_token / 0.9), per_token, model)  # not even one window of 300 tokens
    with pytest.raises(
        DataError,
        match=r"^even 300 tokens per micro-batch exceed the memory limit of 90% of the GPU "
        r"for tiny-random \(LoRA, fp32\); try --load-in-4bit, "
        r"--gradient-checkpointing, a shorter --max-seq-len \(now 300\)$",
    ):
        resolve_token_budget(cfg, CPU, model, fmt, index, small)


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("CUDA error: out of memory"),
    ],
)
def test_out_of_memory_of_every_kind_means_does_not_fit(error):
    def fits(tokens):
        if tokens > 600:
            raise error
        return True

    assert search_budget(fits, start=300, limit=64 * 300, unit=300) == 600

    def never(tokens):
        raise error

    cfg = config(lora=False, max_seq_len=4096, model="HuggingFaceTB/SmolVLM2-2.2B-Instruct")
    with pytest.raises(DataError) as caught:
        search_budget(never, start=4096, limit=64 * 4096, unit=4096, context=memory_advice(cfg, "bf16"))
    assert str(caught.value) == (
        "even 4096 tokens per micro-batch exceed the memory limit of 90% of the GPU for "
        "HuggingFaceTB/SmolVLM2-2.2B-Instruct (full fine-tuning, bf16); try LoRA (--lora), --load-in-4bit with "
        "--lora, --gradient-checkpointing, a shorter --max-seq-len (now 4096)"
    )


def test_other_errors_propagate():
    def broken(tokens):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access") as caught:
        search_budget(broken, start=300, limit=64 * 300, unit=300)
    assert not isinstance(caught.value, DataError)
    advice = memory_advice(config(load_in_4bit=True, gradient_checkpointing=True), "fp16")
    assert advice == (
        " of 90% of the GPU for tiny-random (LoRA, 4-bit, gradient checkpointing, fp16); try a shorter "
        "--max-seq-len (now 4096)"
    )


def test_cuda_memory_total_honours_a_per_process_cap(monkeypatch):
    """The device check caps an 80 GB card to 24 GB with set_per_process_memory_fraction: the search must see 24."""
    from types import SimpleNamespace

    import torch

    from train.budget import CudaMemory

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 0.3)
    assert CudaMemory(torch.device("cuda:0")).total() == int(80 * 2**30 * 0.3)
